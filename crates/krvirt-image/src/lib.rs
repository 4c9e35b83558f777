//! Local images: demo guest builder from Debian packages, containerDisk aliases, cloud-init NoCloud seeds
