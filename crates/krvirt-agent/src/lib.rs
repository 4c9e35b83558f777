//! krvirt host agent: inventory, VMI sync loop, QEMU lifecycle
