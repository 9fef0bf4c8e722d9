"""`diredi-device`: run the daemon, check a configuration, add private feedback.

    diredi-device run --config /etc/diredi-device/device.toml
    diredi-device check --config /etc/diredi-device/device.toml
    diredi-device feedback add --config /etc/diredi-device/device.toml --label 8 sample.npy
    diredi-device feedback add --config /etc/diredi-device/device.toml --label 8 photo.png
    diredi-device csr --config /etc/diredi-device/device.toml > cam-1.csr

Exit codes follow sysexits.h (`config.ExitCode`): 78 for a wrong configuration, which systemd does
not restart on; 70 for an unexpected failure, which it does.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from device_firmware_py.exitcodes import ExitCode

if TYPE_CHECKING:
    from device_firmware_py.config import DeviceConfig

log = logging.getLogger("diredi-device")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"diredi-device: error: {message}\n")
        raise SystemExit(ExitCode.USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diredi-device", description="The DiReDi on-device daemon.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser("run", help="run the daemon (under systemd: Type=notify)")
    run.add_argument("--config", type=Path, required=True, help="the device's TOML configuration")
    check = commands.add_parser("check", help="validate a configuration and its files, then exit")
    check.add_argument("--config", type=Path, required=True)
    csr = commands.add_parser(
        "csr",
        help="print the certificate signing request of the device's own key (made on first use, kept in "
        "the state directory; it never leaves the device)",
    )
    csr.add_argument("--config", type=Path, required=True)
    enrol = commands.add_parser(
        "enrol",
        help="obtain the device's certificate with the claim certificate of its image ([enrolment]); "
        "`run` does this first by itself while there is no certificate",
    )
    enrol.add_argument("--config", type=Path, required=True)
    enrol.add_argument("--timeout", type=float, default=None, help="give up after so many seconds")
    feedback = commands.add_parser("feedback", help="the user's private labelled samples")
    actions = feedback.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = actions.add_parser("add", help="label one input (.npy, or an image); it never leaves the device")
    add.add_argument("--config", type=Path, required=True)
    add.add_argument("--label", type=int, required=True, help="the class the user says it is")
    add.add_argument(
        "file",
        type=Path,
        help="the input: a .npy array of the model's input shape, or a PNG/JPEG if the model takes images",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `diredi-device` console script."""
    # First of all: a SIGTERM while the daemon is still importing and starting is a clean stop too.
    stopping = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopping.set())
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from device_firmware_py.config import load_config
    from device_firmware_py.exceptions import ConfigError, DeviceError

    try:
        config = load_config(args.config)
        if args.command == "run":
            _run(config, stopping)
        elif args.command == "check":
            _check(config)
        elif args.command == "csr":
            _csr(config)
        elif args.command == "enrol":
            from device_firmware_py.enrol import enrol

            sys.stdout.write(f"enrolled: {enrol(config, stopping, timeout_s=args.timeout)}\n")
        else:
            _feedback_add(config, args.label, args.file)
    except ConfigError as exc:
        sys.stderr.write(f"diredi-device: configuration error: {exc}\n")
        raise SystemExit(ExitCode.CONFIG) from None
    except DeviceError as exc:
        sys.stderr.write(f"diredi-device: {exc}\n")
        raise SystemExit(ExitCode.DATA) from None
    raise SystemExit(ExitCode.OK)


def _run(config: DeviceConfig, stopping: threading.Event) -> None:
    from device_firmware_py.daemon import Daemon
    from device_firmware_py.exceptions import ConfigError, DeviceError

    certificate = config.credentials.certificate
    if config.enrolment is not None and certificate is not None and not certificate.exists():
        from device_firmware_py.enrol import enrol

        try:
            enrol(config, stopping)  # zero touch: the image's claim obtains the device's own certificate
        except DeviceError:
            if stopping.is_set():
                return  # stopped while it waited: a clean stop
            raise
    try:
        daemon = Daemon(config, stopping=stopping)
    except ConfigError:
        raise
    except Exception:
        log.exception("the daemon could not start")
        raise SystemExit(ExitCode.SOFTWARE) from None
    try:
        daemon.run()
    except Exception:  # systemd restarts it (Restart=on-failure); the log says why
        log.exception("the daemon failed")
        raise SystemExit(ExitCode.SOFTWARE) from None


def _csr(config: DeviceConfig) -> None:
    from device_firmware_py.config import prepare_state_dir
    from device_firmware_py.identity import device_key, signing_request

    key = device_key(prepare_state_dir(config))
    sys.stdout.write(signing_request(key, config.device_id))


def _check(config: DeviceConfig) -> None:
    from device_firmware_py.config import prepare_state_dir, read_identity

    prepare_state_dir(config)
    read_identity(config)
    sys.stdout.write(f"configuration of {config.device_id} is valid\n")


def _feedback_add(config: DeviceConfig, label: int, file: Path) -> None:
    from device_firmware_py.config import prepare_state_dir
    from device_firmware_py.daemon import STATE_FILES
    from device_firmware_py.exceptions import ConfigError
    from device_firmware_py.feedback import FeedbackStore
    from device_firmware_py.images import ImageInput
    from device_firmware_py.ota import ModelSlots

    state_dir = prepare_state_dir(config)
    active = ModelSlots(state_dir / STATE_FILES["models"]).active()
    if active is None:
        raise ConfigError("no model is installed yet: feedback is labelled against the model's classes")
    _, manifest = active
    store = FeedbackStore(
        state_dir / STATE_FILES["feedback"],
        input_shape=tuple(manifest.input.shape[1:]),
        num_classes=manifest.num_classes,
    )
    count = store.add_file(file, label, ImageInput.of(manifest))
    sys.stdout.write(f"stored; {count} labelled samples on this device (they never leave it)\n")
