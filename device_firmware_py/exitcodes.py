"""The daemon's exit codes (sysexits.h), in a module of their own: the command line needs them before
it imports anything slow."""

import enum


class ExitCode(enum.IntEnum):
    """The daemon's exit codes (sysexits.h). The systemd unit restarts it after any other failure,
    but not after these: a wrong configuration does not fix itself (`RestartPreventExitStatus=`)."""

    OK = 0
    SOFTWARE = 70  # an unexpected error: restarted
    USAGE = 64  # wrong command line
    DATA = 65  # a file given on the command line is not what it should be
    NO_INPUT = 66  # a file given on the command line cannot be read
    CONFIG = 78  # the configuration is wrong
