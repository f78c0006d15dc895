import math

import pytest
import torch

from fp8kit.core import QuantConfig
from fp8kit.core.analysis import layer_errors, sqnr_db
from fp8kit.core.surgery import select_linears

from tiny_models import make_tiny_llama


def test_sqnr_db_known_values():
    ref = torch.tensor([1.0, 1.0])
    assert sqnr_db(ref, torch.tensor([1.1, 0.9])) == pytest.approx(20.0)  # signal 2, noise 0.02
    assert sqnr_db(ref, ref) == math.inf


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(weight="channel", activation_granularity="token"), QuantConfig(activation="static")])
def test_layer_errors_cover_every_target_worst_first(config):
    model = make_tiny_llama()
    errors = layer_errors(model, config, torch.randint(0, 256, (2, 16)))
    assert sorted(e.name for e in errors) == sorted(select_linears(model, config)[0])
    totals = [e.total_db for e in errors]
    assert totals == sorted(totals)
    # FP8 E4M3 round-to-nearest: ~30 dB per operand on Gaussian-like data; a product of two lands above 20 dB.
    for e in errors:
        assert 20 < e.total_db < 40 and e.weight_only_db > 25 and e.activation_only_db > 25, e
        assert e.total_db <= min(e.weight_only_db, e.activation_only_db) + 1
