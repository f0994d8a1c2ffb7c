"""What one training image costs per epoch at SD-2.1's real size: live, from the trajectory, cached.

    python bench/real_size_step.py [--img-size 256] [--fuser gw] [--batch 2]

The demo backbone is so small that recomputing its features is cheap, which caps the demo's
live/cached ratio. This script measures the two sides at the real size on this machine, with
random weights (speed does not depend on the values): the live side is what the reference pays per
training image and epoch (a VAE encode, 10 UNet passes with the 21 layers hooked, and the fuser
and head's training step); the trajectory side is what ``fit --source trajectory`` pays (one UNet
pass per saved timestep, 3, each stopped after the last hooked layer, and the step); the cached
side is the training step alone on maps of the real shapes (the cache's read is measured by
``cache_io.py``). Both use the reference's settings
(``projection_dim`` 384, linear head) and run in fp32 on a CPU, fp16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import time

import torch


def per_image(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (repeats * batch)


def main() -> None:
    from diffusers import AutoencoderKL

    from pipeline.backbone.demo import SD21_UNET_CONFIG, tiny_vae_config
    from pipeline.backbone.layers import ForwardStopped, capture, select_layers
    from pipeline.backbone.sat_unet import SatUNet
    from pipeline.extract.extractor import DEFAULT_LAYER_IDXS, layer_shapes
    from pipeline.model import FusionModel, ModelConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--fuser", default="gw", choices=["gw", "lw", "moe"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast("cuda", torch.float16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    latent = args.img_size // 8

    unet = SatUNet(**{**SD21_UNET_CONFIG, "use_metadata": False, "sample_size": latent}).to(device).eval()
    vae = AutoencoderKL(**tiny_vae_config(args.img_size, full_size=True)).to(device).eval()
    layers = select_layers(unet, DEFAULT_LAYER_IDXS)
    shapes = layer_shapes(unet, layers, latent, 1024, device)
    images = torch.rand(args.batch, 3, args.img_size, args.img_size, device=device) * 2 - 1
    x = torch.randn(args.batch, 4, latent, latent, device=device)
    cond = torch.randn(args.batch, 77, 1024, device=device)
    t = torch.full((args.batch,), 21.0, device=device)

    def unet_pass():
        with torch.no_grad(), autocast, capture(layers):
            unet(x, t, encoder_hidden_states=cond)

    def stopped_pass():
        with torch.no_grad(), autocast, capture(layers, stop=True):
            try:
                unet(x, t, encoder_hidden_states=cond)
            except ForwardStopped:
                pass

    def vae_encode():
        with torch.no_grad():
            return vae.encode(images).latent_dist.mean

    unet_s = per_image(unet_pass, args.batch, args.repeats)
    stopped_s = per_image(stopped_pass, args.batch, args.repeats)
    vae_s = per_image(vae_encode, args.batch, args.repeats)

    model = FusionModel(ModelConfig(args.fuser, "linear", shapes, ["t47", "t45", "t40"], 10, projection_dim=384)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    feats = {ts: {name: torch.randn(args.batch, *shape).half().to(device) for name, shape in shapes.items()}
             for ts in ("t47", "t45", "t40")}
    labels = torch.randint(0, 10, (args.batch,), device=device)

    def train_step():
        opt.zero_grad()
        with autocast:
            logits, _ = model(feats, None)
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        opt.step()

    step_s = per_image(train_step, args.batch, args.repeats)
    live = vae_s + 10 * unet_s + step_s
    trajectory = 3 * stopped_s + step_s
    print(f"device {device}, {args.img_size} px, batch {args.batch}: UNet pass {unet_s:.3f} s/image (stopped after "
          f"the last hooked layer {stopped_s:.3f}), VAE encode {vae_s:.3f} s/image, {args.fuser} training step "
          f"{step_s:.3f} s/image")
    print(f"per training image and epoch: live {live:.2f} s (VAE + 10 passes + step), trajectory {trajectory:.2f} s "
          f"(3 stopped passes + step), cached {step_s:.3f} s (step): {live / step_s:.0f}x and {trajectory / step_s:.0f}x "
          "the cached step")
    print(f"RESULT unet_pass_s={unet_s:.3f} stopped_pass_s={stopped_s:.3f} vae_s={vae_s:.3f} step_s={step_s:.4f} "
          f"live_s={live:.2f} trajectory_s={trajectory:.2f} live_over_cached_per_image={live / step_s:.1f} "
          f"trajectory_over_cached_per_image={trajectory / step_s:.1f}")


if __name__ == "__main__":
    main()
