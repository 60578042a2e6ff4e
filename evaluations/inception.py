"""The Inception network of FID and the ADM suite, its weights, and the two feature sets the metrics use.

The network is torch-fidelity's `FeatureExtractorInceptionV3`: the 2015-12-05 TensorFlow Inception graph
(`classify_image_graph_def.pb`) ported to PyTorch, including TF1's bilinear resize to 299 x 299 and the
(x - 128) / 128 input scaling. Its weights are torch-fidelity's conversion of that graph, a plain state dict.

Features of uint8 images (B, H, W, 3):
- pool (B, 2048): `pool_3`, torch-fidelity's "2048".
- spatial (B, 2023): the graph's `mixed_6/conv`, the ReLU output of the 1x1 branch of the third 17 x 17 block
  (TF's mixed_4..mixed_7 are torch-fidelity's Mixed_6b..Mixed_6e, so this is `Mixed_6d.branch1x1`), first 7
  channels, flattened in TF's height-width-channel order: the reference batches' `mu_s`, `sigma_s` were computed
  by TF in that order.
"""
import io
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from errors import UserError

WEIGHTS_URL = URL_INCEPTION_V3
WEIGHTS_HINT = f"get {WEIGHTS_URL.rsplit('/', 1)[1]} from {WEIGHTS_URL}"
POOL_DIM = 2048
SPATIAL_SIZE, SPATIAL_CHANNELS = 17, 7
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


def default_weights_path():
    """Where torch-fidelity caches its download: $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-*.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]


def load_weights(path=None):
    """The Inception state dict, loaded with weights_only=True, from path or (None) torch-fidelity's cached file,
    downloaded there first when missing. A missing, unreadable or foreign file is a UserError saying where to get it."""
    if path is None:
        path = default_weights_path()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, str(path))
            except OSError as e:
                raise UserError(f"could not download the Inception weights to {path} ({e}); {WEIGHTS_HINT} "
                                f"and pass --inception-weights PATH") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--inception-weights {path}: no such file; {WEIGHTS_HINT}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises pickle, zip and runtime errors of many kinds for a foreign file
        raise UserError(f"{path} is not a weights file that torch.load(weights_only=True) reads "
                        f"({type(e).__name__}); {WEIGHTS_HINT}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; {WEIGHTS_HINT}")
    return state_dict


class InceptionFeatures:
    """uint8 images (B, H, W, 3) as numpy -> (pool (B, 2048), spatial (B, 2023)) float32 tensors on `device`.

    `logits_weight` (1008, 2048) is the graph's softmax/logits MatMul weight, for the Inception Score."""

    def __init__(self, weights_path=None, device="cpu"):
        state_dict = load_weights(weights_path)
        # torch-fidelity's constructor insists on loading the weights itself, unpickling anything; it gets bytes
        # re-serialised here from the tensors that torch.load(weights_only=True) accepted.
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
        except RuntimeError as e:
            raise UserError(f"{weights_path or default_weights_path()} is not the Inception weights "
                            f"({' '.join(str(e).split())[:160]} ...); {WEIGHTS_HINT}") from None
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.logits_weight = self.net.fc.weight
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images):
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)  # the network takes uint8 NCHW
        (pool,) = self.net(x)
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), SPATIAL_DIM)
        self._spatial = None
        return pool, spatial
