"""Ultralytics end to end with its own trainer, offline: ``YOLO("yolov8n.yaml").model`` pruned in module mode at
half the FLOPs at 320 px goes back on the ``YOLO`` object, runs at 640 px, fine-tunes for one epoch with
Ultralytics' trainer on a synthetic dataset written to disk, validates (mAP) and exports to ONNX, whose output
onnxruntime reproduces. No socket may leave the machine (the guard below fails the run if one tries)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")
pytest.importorskip("onnxruntime")
import onnxruntime as ort
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

import fxprune
from fxprune.examples.yolo import OFFLINE_TRAIN_ARGS, install_font, trainer_for, write_shapes_dataset

RECIPE = {"stages": [{"target": {"flops": 0.5}}]}
IMGSZ = 128  # training and validation size: tiny images keep the epoch to seconds on CPU
pytestmark = pytest.mark.xdist_group("ultralytics-workflow")  # one worker runs the module fixture once


def _widths(model: torch.nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


@pytest.fixture(scope="module")
def no_network() -> list:
    """Record and refuse every DNS look-up of a non-local host and every IP connection for the whole module."""
    attempts: list = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(("connect", address))
            raise OSError(f"network access refused in tests: {address}")
        connect(sock, address)

    def guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            attempts.append(("getaddrinfo", host))
            raise socket.gaierror(f"network access refused in tests: {host}")
        return getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
        yield attempts


@pytest.fixture(scope="module")
def workflow(no_network: list, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("yolo")
    install_font()
    data = write_shapes_dataset(work / "shapes", train=32, val=8, size=IMGSZ)
    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    dense = yolo.model.eval()
    pruned = fxprune.compile(dense, RECIPE, example_inputs=torch.rand(1, 3, 320, 320), output="module")
    yolo.model = pruned
    with torch.no_grad():
        out640 = yolo.model.eval()(torch.rand(1, 3, 640, 640))
    before = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    widths = _widths(pruned)
    yolo.train(trainer=trainer_for(pruned), data=str(data), epochs=1, imgsz=IMGSZ, batch=8, project=str(work),
               name="train", **OFFLINE_TRAIN_ARGS)
    trained = yolo.model
    metrics = yolo.val(data=str(data), imgsz=IMGSZ, batch=8, device="cpu", plots=False, project=str(work),
                       name="val", verbose=False)
    return {"yolo": yolo, "dense": dense, "pruned_widths": widths, "before": before, "trained": trained,
            "out640": out640, "metrics": metrics, "attempts": no_network}


def test_pruned_model_is_a_detection_model_at_half_the_flops(workflow: dict) -> None:
    dense, widths = workflow["dense"], workflow["pruned_widths"]
    assert type(workflow["trained"]) is DetectionModel
    shrunk = [name for name, w in widths.items() if w < _widths(dense)[name]]
    assert len(shrunk) > len(widths) // 3, shrunk
    n_dense = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in workflow["trained"].parameters()) < 0.75 * n_dense


def test_it_runs_at_640_px(workflow: dict) -> None:
    assert workflow["out640"][0].shape == (1, 84, 8400)  # 80 x 80 + 40 x 40 + 20 x 20 anchors


def test_ultralytics_trainer_keeps_the_pruned_architecture_and_changes_the_weights(workflow: dict) -> None:
    trained, before = workflow["trained"], workflow["before"]
    assert _widths(trained) == workflow["pruned_widths"]
    after = trained.state_dict()
    assert after.keys() == before.keys()
    floats = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    changed = [k for k in floats if not torch.equal(after[k].float(), before[k].float())]
    assert len(changed) > 0.9 * len(floats), f"{len(changed)} of {len(floats)} weights changed"


def test_validator_reports_map(workflow: dict) -> None:
    box = workflow["metrics"].box
    assert 0.0 <= box.map50 <= 1.0 and 0.0 <= box.map <= 1.0


# Ultralytics' exporter swaps every C2f's forward for forward_split, which splits by the int attribute ``c``:
# module mode sets it to the kept half width (graph_diff: attributes a split elsewhere reads follow the chunk)
def test_onnx_export_runs_in_onnxruntime_like_pytorch(workflow: dict) -> None:
    path = Path(workflow["yolo"].export(format="onnx", imgsz=320, simplify=False, device="cpu"))
    assert path.suffix == ".onnx" and path.is_file()
    x = torch.rand(1, 3, 320, 320)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got, *_) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = workflow["trained"].eval()(x)[0]
    assert got.shape == tuple(want.shape) == (1, 84, 2100)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-3)


def test_nothing_reached_for_the_network(workflow: dict) -> None:
    assert workflow["attempts"] == []  # prune, train, val and the export test before this one
