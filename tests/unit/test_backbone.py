"""Model loading: the fast path (no random init, memory-mapped weights) equals open_clip's own."""

from __future__ import annotations

import open_clip
import pytest
import torch

from winclip_cli.core.backbone import create_uninitialised, load_weights, select_device, select_precision
from winclip_cli.errors import SetupError
from winclip_cli.options import Device, Precision


def reference_model(config, checkpoint):
    model = open_clip.create_model(config.stem, pretrained=str(checkpoint))
    return model.eval()


def assert_same_model(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(model.attn_mask, reference.attn_mask)  # not in checkpoints: rebuilt
    tokens = open_clip.get_tokenizer("winclip-tiny-test")(["a photo of a damaged bottle."])
    with torch.no_grad():
        assert torch.equal(model.eval().encode_text(tokens), reference.encode_text(tokens))


def test_fast_loader_equals_open_clip(tiny_model_files):
    config, checkpoint = tiny_model_files
    model = create_uninitialised(config.stem)
    load_weights(model, checkpoint)
    assert_same_model(model, reference_model(config, checkpoint))


@pytest.mark.parametrize("layout", ["wrapped", "module-prefix", "legacy", "safetensors"])
def test_other_checkpoint_layouts_load_the_same(tmp_path, tiny_model_files, layout):
    config, checkpoint = tiny_model_files
    state = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "weights.pt"
    if layout == "wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif layout == "module-prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif layout == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_uninitialised(config.stem)
    load_weights(model, path)
    assert_same_model(model, reference_model(config, checkpoint))


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path, tiny_model_files):
    config, _ = tiny_model_files
    marker = tmp_path / "UNPICKLED"

    class Tripwire:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": Tripwire()}, evil)
    with pytest.raises(Exception, match="(?i)weights only|unpickl|unsupported"):
        load_weights(create_uninitialised(config.stem), evil)
    assert not marker.exists()


def test_device_and_precision_choice_on_this_machine():
    cpu = torch.device("cpu")
    assert select_device(Device("cpu")) == cpu
    assert select_precision(Precision.FP32, cpu) == "fp32"
    assert select_precision(Precision.AUTO, cpu) in ("fp32", "bf16")
    with pytest.raises(SetupError, match="fp16"):
        select_precision(Precision.FP16, cpu)
    if not torch.cuda.is_available():
        assert select_device(Device("auto")) in (cpu, torch.device("mps"))
        with pytest.raises(SetupError, match="no CUDA GPU"):
            select_device(Device("cuda"))
