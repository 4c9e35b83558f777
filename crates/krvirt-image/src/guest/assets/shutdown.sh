#!/bin/sh
# Run by busybox init before it kills everything and powers off/reboots.
echo "GUEST-SHUTDOWN"
sync
umount /run/cidata 2>/dev/null
exit 0
