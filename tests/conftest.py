"""Suite-wide settings.

The test shapes are tiny, so one torch thread is fastest and stays fast when other processes share
the two cores (two threads then slow small ops by orders of magnitude). The command line keeps an
inner-product cache in the user's cache directory by default, authenticated by a key in the user's
config directory: every test gets its own of both, so that no test reads another's entries or writes
to the real home directory.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    monkeypatch.delenv("FEDBIP_CACHE_KEY", raising=False)


@pytest.fixture(scope="module")
def bbc_once():
    """The embedded BBC corpus read once per module of simulation runs (and one intra-op thread, as
    above: on a busy machine two threads spin against each other and a step is tens of times slower)."""
    import functools

    from fedbip_cli.simulate import loop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "load_bbc", functools.cache(loop.load_bbc))
        yield
