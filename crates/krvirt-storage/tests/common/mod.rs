pub mod ceph;
