"""A figure in the style of the paper's Figure 4, from a checkpoint and an image.

    python reports/attention_figure.py runs/<run>/checkpoints/best.pt IMAGE.png [--label LABEL.png]
        [--points 60,80 120,200] [--channels 3 11] [--why "the median-mIoU seed"] [--out attention.png]

Columns: the image with the query points, the PAM attention map of each point (where that pixel
looks; one colour scale across the PAM maps, each with its colour bar), two CAM channel responses
(each on its own scale, with its colour bar) (the channel-attention output of chosen channels), the
prediction and, with --label, the ground truth. The model is rebuilt from the config stored in
the checkpoint; only the rows of the attention matrix for the chosen points are computed.
This is the one report that loads a model: it needs torch, the tables do not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from danet.config import RunConfig  # noqa: E402
from danet.data.base import rescale  # noqa: E402
from danet.data.transforms import eval_transform  # noqa: E402
from danet.engine import load_checkpoint  # noqa: E402
from danet.models import build  # noqa: E402


def parse_point(text: str) -> tuple[int, int]:
    row, col = (int(value) for value in text.split(","))
    return row, col


def attention_figure(checkpoint_path: Path, image_path: Path, points: list[tuple[int, int]] | None,
                     channels: list[int], label_path: Path | None = None, why: str = "") -> plt.Figure:
    checkpoint = load_checkpoint(checkpoint_path)
    cfg = RunConfig.from_dict(checkpoint["config"])
    model = build(cfg.model.__class__(**{**cfg.model.to_dict(), "weights": "none"}))
    model.load_state_dict(checkpoint["model"])
    model.eval()

    label = np.asarray(Image.open(label_path)) if label_path else None
    image, label = rescale(np.asarray(Image.open(image_path).convert("RGB")), label, cfg.data.image_scale)
    height, width = image.shape[:2]
    points = points or [(height // 3, width // 3), (2 * height // 3, 2 * width // 3)]
    tensor = eval_transform()(image=image)["image"][None]
    with torch.no_grad():
        maps = model.attention_maps(tensor, points)
        prediction = model(tensor)["out"].argmax(1)[0].numpy()

    columns = 1 + (len(points) if "pam" in maps else 0) + (len(channels) if "cam" in maps else 0) + 1 + bool(label_path)
    figure, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 3.2 * height / width + 0.6))
    axes = list(np.atleast_1d(axes))
    axis = axes.pop(0)
    axis.imshow(image)
    for index, (row, col) in enumerate(points):
        axis.scatter([col], [row], s=60, marker="+", color="red", linewidths=2)
        axis.annotate(str(index + 1), (col, row), color="yellow", fontsize=10, xytext=(4, 4), textcoords="offset points")
    axis.set_title("image and query points")
    if "pam" in maps:
        upsampled = F.interpolate(maps["pam"], size=(height, width), mode="bilinear", align_corners=True)[0]
        # one scale for every PAM map: a flat map must look flat beside a peaked one
        highest = float(upsampled.max())
        for index, attention in enumerate(upsampled):
            axis = axes.pop(0)
            axis.imshow(image)
            shown = axis.imshow(attention.numpy(), cmap="jet", alpha=0.55, vmin=0.0, vmax=highest)
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02, label="attention weight (shared scale)")
            axis.scatter([points[index][1]], [points[index][0]], s=60, marker="+", color="white", linewidths=2)
            axis.set_title(f"PAM: attention of point {index + 1}")
    if "cam" in maps:
        features = maps["cam_features"].float().flatten(2)  # B, C, N
        responses = (maps["cam"] @ features).view(maps["cam_features"].shape)[0]
        for channel in channels:
            axis = axes.pop(0)
            shown = axis.imshow(F.interpolate(responses[None, channel:channel + 1], size=(height, width),
                                              mode="bilinear", align_corners=True)[0, 0].numpy(), cmap="jet")
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02, label="response (this channel's scale)")
            axis.set_title(f"CAM: channel {channel} response")
    axis = axes.pop(0)
    axis.imshow(prediction, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
    axis.set_title("prediction")
    if label is not None:
        label = label.astype(float)
        label[label >= cfg.model.num_classes] = np.nan
        axes.pop(0).imshow(label, cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        figure.axes[-1].set_title("ground truth (white: ignored)")
    for axis in figure.axes:
        if not axis.get_label() == "<colorbar>":
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"{cfg.cell_name()}, seed {cfg.train.seed} ({why or 'seed chosen by hand, reason not given'}): "
                    "where the attention looks")
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reports/attention_figure.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of a run with PAM and/or CAM")
    parser.add_argument("image", type=Path, help="an image (RGB)")
    parser.add_argument("--label", type=Path, help="its label PNG (class ids), shown as ground truth")
    parser.add_argument("--points", type=parse_point, nargs="+", metavar="ROW,COL",
                        help="query pixels in image coordinates after the run's --image-scale (default: two)")
    parser.add_argument("--channels", type=int, nargs="+", default=[0, 1], help="CAM channels to show (default: 0 1)")
    parser.add_argument("--why", default="", help="why this run's seed, for the title (e.g. 'the median-mIoU seed "
                                                  "of the cell')")
    parser.add_argument("--out", type=Path, default=Path("reports/out/attention.png"),
                        help="output file; a .pdf is written beside the .png (default: reports/out/attention.png)")
    args = parser.parse_args(argv)
    for path in (args.checkpoint, args.image):
        if not path.is_file():
            print(f"{parser.prog}: error: no such file: {path}", file=sys.stderr)
            return 2
    figure = attention_figure(args.checkpoint, args.image, args.points, args.channels, args.label, args.why)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=150, bbox_inches="tight")
    figure.savefig(args.out.with_suffix(".pdf"), bbox_inches="tight")
    print(f"wrote {args.out} and {args.out.with_suffix('.pdf')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
