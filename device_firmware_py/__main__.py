"""`python -m device_firmware_py`: the same as the `diredi-device` command."""

from device_firmware_py.cli import main

main()
