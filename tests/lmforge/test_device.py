"""`--device` (and `engine.device`): a malformed device, or one this machine lacks, is one line
naming the flag (exit 2), checked before any model is loaded, never a traceback from torch."""

from __future__ import annotations

import pytest
import torch

from lmforge.cli import main
from lmforge.devices import check_device
from lmforge.errors import UserError

HAS_CUDA = torch.cuda.is_available()


def test_valid_devices():
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(" cpu ") == torch.device("cpu")
    expected_auto = "cuda" if HAS_CUDA else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert check_device("auto").type == expected_auto


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "--device bogus: not a device; use auto, cpu, cuda, cuda:N or mps"),
        ("cuda:x", "--device cuda:x: not a device"),
        ("", "--device : not a device"),
        ("meta", "--device meta: lmforge does not run on 'meta' devices"),
    ],
)
def test_malformed_or_unsupported_devices_are_refused(spec, message):
    with pytest.raises(UserError) as err:
        check_device(spec)
    assert str(err.value).startswith(message)


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_on_a_cpu_only_machine(spec):
    with pytest.raises(
        UserError, match=rf"^--device {spec}: no CUDA device is available .*use --device cpu$"
    ):
        check_device(spec)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_index_beyond_the_visible_devices():
    count = torch.cuda.device_count()
    assert check_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=rf"there is no such CUDA device \({count} visible"):
        check_device(f"cuda:{count}")


def test_the_name_in_the_message_is_the_callers():
    with pytest.raises(UserError, match=r"^engine\.device bogus: "):
        check_device("bogus", name="engine.device")


@pytest.mark.parametrize("spec", ["bogus", "meta", *([] if HAS_CUDA else ["cuda"])])
def test_generate_refuses_the_device_in_one_line(tmp_path, capsys, spec):
    code = main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", spec])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"lmforge generate: error: --device {spec}:"), err
    assert "Traceback" not in err
