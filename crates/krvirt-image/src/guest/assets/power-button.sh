#!/bin/sh
# Spawned by acpid on an ACPI power button press (QMP system_powerdown).
echo "POWER-BUTTON: powering off" >/dev/console
exec /sbin/poweroff
