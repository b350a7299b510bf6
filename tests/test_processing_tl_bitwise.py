"""HF -> TL conversion and weight processing give TL 3.9's float32 tensors bit for bit, so the eager backend
reproduces TL's logits exactly after `from_pretrained` (not only when it holds TL's weights)."""
from __future__ import annotations

import pytest
import torch
from conftest import HF_CONFIGS, tl_model_from_hf

import hooklens
from hooklens import HookedTransformer

pytestmark = pytest.mark.usefixtures("no_grad", "single_thread")

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
# The processing TL's from_pretrained variants apply: default, fold_ln only, none (from_pretrained_no_processing).
PROCESSING = {
    "default": dict.fromkeys(FLAGS, True),
    "fold_ln_only": {**dict.fromkeys(FLAGS, False), "fold_ln": True},
    "none": dict.fromkeys(FLAGS, False),
}
TOKENS = torch.randint(0, 50000, (2, 17), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("processing", list(PROCESSING))
@pytest.mark.parametrize("config_name", list(HF_CONFIGS))
def test_processed_weights_and_eager_logits_equal_transformerlens(hf_dirs, config_name, processing):
    flags = PROCESSING[processing]
    ours = HookedTransformer.from_pretrained(str(hf_dirs[config_name]), **flags)
    theirs = tl_model_from_hf(hf_dirs[config_name], **flags)
    assert ours.cfg.normalization_type == theirs.cfg.normalization_type
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    unequal = [name for name in b if not torch.equal(a[name], b[name])]
    assert not unequal, f"tensors not bitwise equal to TL 3.9's: {unequal}"
    with hooklens.attention_backend("eager"):
        assert torch.equal(ours(TOKENS), theirs(TOKENS))


def test_load_checkpoint_returns_contiguous_tensors(tiny_dir):
    # Conversion keeps TL's strided views so processing rounds as TL does; what load_checkpoint hands out is
    # contiguous (safetensors.save_file refuses anything else).
    for flags in PROCESSING.values():
        _, state = hooklens.loading.load_checkpoint(str(tiny_dir), **flags)
        assert all(v.is_contiguous() for v in state.values())
