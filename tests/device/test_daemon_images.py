"""The daemon on a conv model that takes images, as a process that cannot import torch: it installs the
model, serves it from the PNG files a camera drops into its input directory, stores the user's labelled
photos (`diredi-device feedback add photo.png`) and runs RD on them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloud.ml.data import Split
from cloud.ml.datasources import load_dataset
from cloud.ml.distill import TrainConfig
from cloud.ml.families import NetSpec
from cloud.ml.line import EdgeLine, TrainingPlan, train_line
from tests.brokers import Probe, RunningBroker, new_device_id, provisioned_device
from tests.device.daemons import DaemonProcess, install_model, wait_until, write_config
from wire.knowledge import KnowledgeReport
from wire.topics import MessageKind, device_topic

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRUST = {"0123456789abcdef": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}  # no update in this test
FEW_EPOCHS = TrainingPlan(
    teacher=TrainConfig(epochs=3),
    student=TrainConfig(epochs=6, lr=3e-3),
    teacher_finetune=TrainConfig(epochs=1),
    rekd=TrainConfig(epochs=1),
)


@pytest.fixture(scope="module")
def mnist() -> Split:
    """The 5,000 images (stored class by class), shuffled."""
    dataset = load_dataset("mnist-5k")
    order = np.random.default_rng(0).permutation(len(dataset.labels))
    return Split(x=(dataset.inputs[order] / dataset.input_scale).astype(np.float32), y=dataset.labels[order])


@pytest.fixture(scope="module")
def conv_line(mnist: Split) -> EdgeLine:
    """The built-in conv family, briefly trained on 1,500 MNIST images (accuracy is not the point)."""
    train = Split(x=mnist.x[:1500], y=mnist.y[:1500])
    val = Split(x=mnist.x[1500:2000], y=mnist.y[1500:2000])
    spec = NetSpec("conv", (1, 28, 28), 10)
    return train_line(train, spec, FEW_EPOCHS, line="photos", val=val, pixel_scale=255.0)


def torchless(workdir: Path) -> dict[str, str]:
    """An environment whose `torch` is a package that refuses to import."""
    stub = workdir / "no-torch" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("torch is not installed on the device")\n')
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = os.pathsep.join([str(stub.parent), str(ROOT)])
    return env


def save_png(x: np.ndarray, path: Path) -> Path:
    Image.fromarray(np.rint(x[0] * 255).astype(np.uint8), mode="L").save(path)
    return path


def test_the_daemon_serves_image_files_and_runs_rd_on_labelled_photos_without_torch(
    tmp_path: Path, mosquitto: RunningBroker, conv_line: EdgeLine, mnist: Split
) -> None:
    # Prepare: the device with the conv model installed, a camera directory and a torchless environment
    device_id = new_device_id("photo")
    secret = provisioned_device(mosquitto, device_id)
    camera = tmp_path / "camera"
    camera.mkdir()
    config = write_config(
        tmp_path, mosquitto.target, device_id, secret, camera, trust=TRUST, new_samples=20, source="directory"
    )
    install_model(tmp_path, conv_line.artifact.model, conv_line.artifact.manifest)
    env = torchless(tmp_path)
    probe = Probe(mosquitto.cloud, f"cloud-{device_id}")
    assert probe.connect() is not None
    probe.subscribe(f"diredi/v1/dev/{device_id}/#")
    photos = [save_png(x, camera / f"{i:03d}.png") for i, x in enumerate(mnist.x[3000:3030])]
    daemon = DaemonProcess(config, tmp_path, env=env).start()
    try:
        # Execute: the camera's photos are served; then the user labels 24 photos of ones as twos
        wait_until(lambda: not any(p.exists() for p in photos), 60, "the camera's photos served")
        ones = np.flatnonzero(mnist.y[3100:] == 1)[:24] + 3100
        for i in ones:
            added = subprocess.run(  # noqa: S603
                [sys.executable, "-m", "device_firmware_py", "feedback", "add", "--config", str(config)]
                + ["--label", "2", str(save_png(mnist.x[i], tmp_path / f"label-{i}.png"))],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert added.returncode == 0, added.stderr
        seen: list[tuple[str, bytes]] = []

        def published(kind: MessageKind) -> list[bytes]:
            while not probe.messages.empty():
                message = probe.messages.get()
                seen.append((message.topic, bytes(message.payload)))
            return [payload for topic, payload in seen if topic == device_topic(device_id, kind)]

        try:
            payload = wait_until(lambda: published(MessageKind.KNOWLEDGE)[:1], 90, "a knowledge report")[0]
        except AssertionError:
            raise AssertionError(daemon.tail(60)) from None
        served = wait_until(
            lambda: [s for s in map(json.loads, published(MessageKind.STATUS)) if s["inference_count"] >= 30],
            30,
            "a status counting the photos",
        )
    finally:
        code = daemon.terminate()
        probe.close()

    # Assert: the model served every photo, RD ran on the labelled ones (counts: the ones are twos)
    assert served[-1]["model_id"] == conv_line.model_id
    knowledge = KnowledgeReport.from_bytes(payload)
    assert knowledge.base_model_id == conv_line.model_id and knowledge.sample_count >= 20
    counts = knowledge.counts()
    assert counts[:, 2].sum() >= 20  # every labelled photo says "two", whatever the model read
    log = daemon.log()
    assert code == 0 and "Traceback" not in log, daemon.tail()
    assert not (camera / "rejected").exists()
    # and torch could not have been loaded: the environment's torch refuses to import
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)  # noqa: S603
    assert blocked.returncode != 0 and "torch is not installed on the device" in blocked.stderr
