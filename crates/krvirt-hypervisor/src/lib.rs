//! QEMU driver: command line from a VM config, QMP client, process lifecycle, accelerator detection
