"""The Inception network of FID and the ADM suite, its weights, and the two feature sets the metrics use.

The network is torch-fidelity's `FeatureExtractorInceptionV3`: the 2015-12-05 TensorFlow Inception graph
(`classify_image_graph_def.pb`) ported to PyTorch, including TF1's bilinear resize to 299 x 299 and the
(x - 128) / 128 input scaling. Its weights are torch-fidelity's conversion of that graph, a plain state dict.

The file's name carries the first 8 hex digits of its SHA-256 (`6726825d`, torch.hub's convention); a file whose
checksum does not start with them is refused, unless the caller passes verify=False (tests and speed measurements, with random weights).

Features of uint8 images (B, H, W, 3):
- pool (B, 2048): `pool_3`, torch-fidelity's "2048".
- spatial (B, 2023): the graph's `mixed_6/conv`, the ReLU output of the 1x1 branch of the third 17 x 17 block
  (TF's mixed_4..mixed_7 are torch-fidelity's Mixed_6b..Mixed_6e, so this is `Mixed_6d.branch1x1`), first 7
  channels, flattened in TF's height-width-channel order: the reference batches' `mu_s`, `sigma_s` were computed
  by TF in that order.
"""
import hashlib
import io
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from errors import UserError

WEIGHTS_URL = URL_INCEPTION_V3
WEIGHTS_HINT = f"get {WEIGHTS_URL.rsplit('/', 1)[1]} from {WEIGHTS_URL}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # the hash part of the file's name
POOL_DIM = 2048
SPATIAL_SIZE, SPATIAL_CHANNELS = 17, 7
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


def default_weights_path():
    """Where torch-fidelity caches its download: $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-*.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]


def file_sha256(path):
    """The SHA-256 of a file as 64 hex digits, read in 1 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def load_weights(path=None, verify=True):
    """(state dict, SHA-256 of the file): the Inception weights, loaded with weights_only=True, from path or (None)
    torch-fidelity's cached file, downloaded there first when missing (checked against the published prefix on the
    way). A missing, unreadable or foreign file, or one whose SHA-256 does not start with the published prefix (when
    verify), is a UserError saying where to get the right one."""
    if path is None:
        path = default_weights_path()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, str(path), hash_prefix=WEIGHTS_SHA256_PREFIX)
            except (OSError, RuntimeError) as e:  # RuntimeError: the download's checksum is not the published one
                raise UserError(f"could not download the Inception weights to {path} ({' '.join(str(e).split())}); "
                                f"{WEIGHTS_HINT} and pass --inception-weights PATH") from None
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--inception-weights {path}: no such file; {WEIGHTS_HINT}")
    sha256 = file_sha256(path)
    if verify and not sha256.startswith(WEIGHTS_SHA256_PREFIX):
        raise UserError(f"{path}: SHA-256 {sha256[:8]}... is not the published {WEIGHTS_SHA256_PREFIX}... of the "
                        f"Inception weights (a damaged or different file); {WEIGHTS_HINT}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises pickle, zip and runtime errors of many kinds for a foreign file
        raise UserError(f"{path} is not a weights file that torch.load(weights_only=True) reads "
                        f"({type(e).__name__}); {WEIGHTS_HINT}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; {WEIGHTS_HINT}")
    return state_dict, sha256


def random_state_dict(seed=0):
    """torch-fidelity's InceptionV3 with random weights, as the plain state dict its weights file holds: for tests and
    speed measurements where the published file is not at hand (its features are not the suite's).

    Convolutions get He-normal weights and batch norms random affine and running statistics, so that activations
    neither vanish nor explode through the 20 blocks and the features differ between images."""

    class Skeleton(FeatureExtractorInceptionV3):
        """The architecture alone: its constructor's load of the (unavailable) weights is skipped."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = Skeleton("skeleton", ["2048"], feature_extractor_weights_path=empty)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=generator) * 0.05)
        net.fc.bias.copy_(torch.randn(net.fc.bias.shape, generator=generator))
    return net.state_dict()


class InceptionFeatures:
    """uint8 images (B, H, W, 3) as numpy -> (pool (B, 2048), spatial (B, 2023)) float32 tensors on `device`.

    `logits_weight` (1008, 2048) is the graph's softmax/logits MatMul weight, for the Inception Score; `sha256` the
    weights file's checksum. verify=False accepts weights of any checksum: for tests and timings with random weights."""

    def __init__(self, weights_path=None, device="cpu", verify=True):
        state_dict, self.sha256 = load_weights(weights_path, verify)
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
