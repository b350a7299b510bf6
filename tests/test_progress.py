"""Progress bars honour TQDM_DISABLE even though hooklens passes tqdm's `disable` itself."""
import pytest
import torch

from hooklens import patching
from hooklens.progress import bar_disabled


@pytest.mark.parametrize("value, disabled", [(None, False), ("", False), ("0", False), ("false", False),
                                             ("1", True), ("true", True), ("True", True)])
def test_bar_disabled_reads_tqdm_disable(monkeypatch, value, disabled):
    if value is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", value)
    assert bar_disabled(True) is disabled
    assert bar_disabled(False) is True


@pytest.mark.parametrize("env", [None, "1"])
def test_sweep_bar_follows_tqdm_disable(tiny_model, monkeypatch, capsys, env):
    """A sweep with progress=True draws its bar on stderr, unless TQDM_DISABLE=1."""
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    model = tiny_model
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 5))
    _, cache = model.run_with_cache((tokens + 1) % model.cfg.d_vocab)  # a clean prompt that differs
    patching.get_act_patch_resid_pre(model, tokens, cache, lambda logits: logits[:, -1, 0].mean(), progress=True)
    err = capsys.readouterr().err
    assert ("it/s" in err or "%|" in err) is (env is None), err
