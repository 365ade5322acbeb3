"""TAESD's decoder (issue 17's optional previews) against diffusers' AutoencoderTiny on the same weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderTiny
from safetensors.torch import save_file

from sdterm.engine.networks.taesd import TAESDDecoder, TAESDError, load_taesd

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(3)
    model = AutoencoderTiny().eval()
    with torch.no_grad():
        for p in model.parameters():  # diffusers' init gives a near-constant picture; this one has detail
            p.copy_(torch.randn_like(p) * 0.08)
    return model


def diffusers_file(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_decoder_matches_diffusers_autoencoder_tiny(reference, tmp_path):
    ours = load_taesd(diffusers_file(reference, tmp_path / "diffusion_pytorch_model.safetensors"))
    latent = torch.randn(1, 4, 12, 10) * 2
    with torch.no_grad():
        theirs = reference.decode(latent).sample  # [-1, 1]
        mine = ours(latent)
    assert mine.shape == (1, 3, 96, 80)
    assert torch.allclose(mine * 2 - 1, theirs, atol=1e-5, rtol=1e-5)
    assert theirs.std() > 0.05  # a picture with detail, not a constant


def test_the_original_key_names_load_too(reference, tmp_path):
    original = {f"{int(k.split('.')[2]) + 1}.{k.split('.', 3)[3]}": v.contiguous()
                for k, v in reference.state_dict().items() if k.startswith("decoder.layers.")}
    assert "1.weight" in original and "3.conv.0.weight" in original and "20.weight" not in original
    save_file(original, str(tmp_path / "taesd_decoder.safetensors"))
    ours = load_taesd(tmp_path / "taesd_decoder.safetensors")
    assert set(ours.state_dict()) == set(original)
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(ours(latent) * 2 - 1, reference.decode(latent).sample, atol=1e-5)


def test_a_file_that_is_not_taesd_is_one_line(tmp_path):
    bad = tmp_path / "other.safetensors"
    save_file({"1.weight": torch.zeros(64, 16, 3, 3)}, str(bad))  # a 16-channel latent: not SD v1's
    with pytest.raises(TAESDError) as info:
        load_taesd(bad)
    assert "not SD v1 TAESD's decoder" in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(TAESDError, match="can't be read"):
        load_taesd(junk)
    assert sum(p.numel() for p in TAESDDecoder().parameters()) == 1222531


def test_sdterm_download_taesd_puts_it_where_the_engine_looks(reference, tmp_path, hub):
    """``sdterm download taesd`` (its hub file, diffusers' layout) lands in the data folder, where
    ``make_engine`` finds it, and loads as the decoder."""
    from sdterm.cli.engine_setup import taesd_file
    from sdterm.download.catalog import TAESD, download_extra

    data = diffusers_file(reference, tmp_path / "src.safetensors").read_bytes()
    hub.add(TAESD.repo, TAESD.filename, data)
    assert taesd_file(tmp_path / "data") is None
    path = download_extra("taesd", tmp_path / "data", endpoint=hub.url, progress=False)
    assert path == taesd_file(tmp_path / "data") and path.read_bytes() == data
    assert isinstance(load_taesd(path), TAESDDecoder)


from .test_download import hub, hub_env  # noqa: E402  (the fake hub's fixtures)

__all__ = ["hub", "hub_env"]


def test_previews_use_taesd_every_n_steps_and_the_last(reference, tmp_path):
    """A Previewer with TAESD's decoder: image-sized frames (scale 1) at every 2nd step and the
    last, the linear map's latent-sized ones (scale 8) between; the TAESD frame is the decoder's
    picture of the predicted clean latent."""
    from sdterm.engine.events import Preview
    from sdterm.engine.preview import Previewer, taesd_rgb
    from sdterm.engine.sampling.kdiffusion import DiscreteSigmas

    decoder = load_taesd(diffusers_file(reference, tmp_path / "t.safetensors"))
    sigmas = DiscreteSigmas(torch.linspace(0.03, 14.6, 1000))
    frames = []
    p = Previewer(frames.append, 0.0, sigmas, taesd=decoder, every=2)  # the 2nd, 4th frame sent and the last
    x, eps = torch.randn(1, 4, 6, 5), torch.randn(1, 4, 6, 5)
    for step in range(1, 6):
        p.offer(step, 5, (x, 500.0, eps))
    p.close()
    assert [(f.step, f.scale, f.image.size) for f in frames] == [
        (1, 8, (5, 6)), (2, 1, (40, 48)), (3, 8, (5, 6)), (4, 1, (40, 48)), (5, 1, (40, 48))]
    assert all(isinstance(f, Preview) for f in frames)
    from sdterm.engine.preview import predicted_x0

    with torch.no_grad():
        expected = taesd_rgb(decoder, predicted_x0(x, 500.0, eps, sigmas))
    assert torch.equal(torch.from_numpy(__import__("numpy").asarray(frames[1].image)), expected)


def test_taesd_is_never_used_on_the_cpu_nor_without_room(tmp_path):
    from sdterm.engine.networks.taesd import taesd_bytes
    from sdterm.engine.preview import TaesdSource

    source = TaesdSource(tmp_path / "missing.safetensors")  # never read in these cases
    notes = []
    cuda = torch.device("cuda")
    assert source.for_pass(torch.device("cpu"), torch.float32, 10**12, 0, 512, 512, notes.append) is None
    assert source.for_pass(cuda, torch.float16, None, 0, 512, 512, notes.append) is None  # no budget known
    need = taesd_bytes(512, 512, 2)
    assert source.for_pass(cuda, torch.float16, 2**30, 2**30 - need + 1, 512, 512, notes.append) is None
    assert notes == [] and source.failed is None
