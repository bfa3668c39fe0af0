"""kernelrl.ops._native.launch: a CUDA entry point gets the current stream of the tensor's
device as its last argument (checked without a GPU: torch's device and stream queries
stood in for), and a CPU one runs with torch's thread count."""

import pytest
import torch

from kernelrl.ops import _native


@pytest.fixture
def fake_cuda(monkeypatch):
    """Device 1 current; device i's current stream is 1000 + i."""
    state = {"current": 1, "entered": []}

    class Guard:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            state["entered"].append(self.index)
            state["saved"], state["current"] = state["current"], self.index

        def __exit__(self, *exc):
            state["current"] = state["saved"]

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(_native, "_raw_stream", lambda index: 1000 + index)
    return state


@pytest.mark.parametrize("device,stream,switched", [
    (torch.device("cuda"), 1001, []),          # no index: the current device
    (torch.device("cuda", 1), 1001, []),       # the current device
    (torch.device("cuda", 0), 1000, [0]),      # another: switched to it for the launch
])
def test_cuda_launch_gets_that_devices_current_stream(fake_cuda, device, stream, switched):
    got = []
    _native.launch(device, lambda *a: pytest.fail("the CPU entry ran"),
                   lambda *a: got.append(a), 7, 8)
    assert got == [(7, 8, stream)]
    assert fake_cuda["entered"] == switched and fake_cuda["current"] == 1


def test_current_stream_without_the_raw_query(monkeypatch):
    class Stream:
        cuda_stream = 42

    monkeypatch.setattr(_native, "_raw_stream", None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: Stream())
    assert _native.current_stream(0) == 42


@pytest.mark.gpu
def test_current_stream_is_torchs():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert _native.current_stream(torch.cuda.current_device()) == side.cuda_stream
    assert (_native.current_stream(torch.cuda.current_device())
            == torch.cuda.current_stream().cuda_stream)
