"""`s2attn bench` off the GPU: its provider list and the reason a provider cannot run."""

import importlib.util

import pytest

from s2attn.apps import bench


def test_unknown_providers_are_refused_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        bench.build_parser().parse_args(["--providers", "s2attn,flex-fa5"])
    assert e.value.code == 2
    assert "unknown provider(s) flex-fa5" in capsys.readouterr().err
    assert bench.build_parser().parse_args(["--providers", "fa4, flex-fa4-128"]).providers == ["fa4", "flex-fa4-128"]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn-4 is installed here")
@pytest.mark.parametrize("name", ["fa4", "flex-fa4-128", "flex-fa4-same"])
def test_flashattention4_providers_say_what_is_missing(name):
    with pytest.raises(bench.Unavailable, match="flash-attn-4"):
        bench._available(name)
    bench._available("flex-128")  # no package needed
