"""
Generator fidelity on the demo world, where ground truth exists: every generated image is compared
with the oracle render of the same file name (same identity, pose and viewpoint; demo/oracle.py):
PSNR (whole image and person only), SSIM and foreground-mask IoU, with two controls: the oracle of
the same identity in ANOTHER target pose (pose-shuffled: does the sample follow the pose?) and the
oracle of ANOTHER identity in the same target pose (does it keep the identity?).

  python demo/fidelity.py --generated runs/demo/augmented/vi --oracle runs/demo/augmented/oracle \\
      [--out runs/demo/results/fidelity.json] [--sheet sheet.png --data runs/demo/world --targets runs/demo/targets/vi]

Writes <generated>/fidelity.json (--out), and with --sheet a PNG of references and their
(skeleton | generated | oracle) triples.
"""
import os
import sys
import argparse

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import util  # noqa: E402
from util import UserError  # noqa: E402
from body import cond_path  # noqa: E402


def estimate_mask(img, thr=0.12):
    """Foreground of an HxWx3 [0,1] image: pixels far from the median colour of the image border
    (the demo world's backgrounds are plain per camera, so the border is background)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.linalg.norm(img - np.median(border, axis=0), axis=-1) > thr * np.sqrt(3)


def ssim(a, b):
    """SSIM (Wang et al. 2004: an 11x11 gaussian window of sigma 1.5, per channel, averaged) of
    HxWx3 images in [0,1], by scikit-image."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def psnr(a, b, mask=None):
    """PSNR in dB of [0,1] images, by scikit-image; mask: only those pixels (the person: backgrounds
    of generated and oracle images come from different cameras, so the whole-image figure mixes
    them in)."""
    from skimage.metrics import peak_signal_noise_ratio
    if mask is not None:
        a, b = a[mask], b[mask]
    if a.size == 0:
        return 0.0
    if np.array_equal(a, b):
        return 100.0  # identical: skimage says inf; 100 dB keeps means finite
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def colourfulness(img, mask=None):
    """Mean over the (masked) pixels of the standard deviation across R, G and B, in 0-255 units:
    0 for a grey image. The demo's people differ mostly by the colours of their clothes."""
    px = img[mask] if mask is not None else img.reshape(-1, 3)
    return float(px.std(axis=-1).mean() * 255) if len(px) else 0.0


def vae_ceiling(generator, images, masks):
    """What the generator's frozen VAE alone keeps of the oracle renders (encode, decode): person
    PSNR and colourfulness of the reconstructions. No sample can be closer than its own VAE allows."""
    import torch
    import models
    _, vae, _, _, _ = models.load_generator(generator)  # its own vae/, or the pretrained one it names
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2 - 1
    with torch.no_grad():
        rec = torch.cat([models.decode_latents(vae, models.encode_latents(vae, x[i:i + 64])) for i in range(0, len(x), 64)])
    rec = models.to_uint8(rec) / 255.0  # what a written image of the reconstruction would hold
    return dict(psnr_foreground=float(np.mean([psnr(r, o, m) for r, o, m in zip(rec, images, masks)])),
                colourfulness=float(np.mean([colourfulness(r, m) for r, m in zip(rec, masks)])), n=len(images))


def iou(m1, m2):
    u = np.logical_or(m1, m2).sum()
    return float(np.logical_and(m1, m2).sum() / u) if u else 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", required=True, help="variant folder: manifest.csv + bounding_box_train/")
    p.add_argument("--oracle", required=True, help="oracle folder of the same layout and file names (demo/oracle.py)")
    p.add_argument("--oracle-masks", default=None, help="folder of oracle foreground masks <stem>.mask.png "
                   "(default <oracle>/masks, written by demo/oracle.py; else estimated like the generated ones)")
    p.add_argument("--out", default=None, help="JSON to write (default <generated>/fidelity.json)")
    p.add_argument("--sheet", default=None, help="also write a PNG contact sheet: per row a reference, then "
                   "4 x (target skeleton | generated | oracle); needs --data and --targets")
    p.add_argument("--data", default=None, help="with --sheet: the data set root whose bounding_box_train/ "
                   "holds the references")
    p.add_argument("--targets", default=None, help="with --sheet: the target set (maps/<target_id>.skeleton.png)")
    p.add_argument("--sheet-rows", type=int, default=6, help="references on the contact sheet")
    p.add_argument("--generator", default=None, help="the generator folder: also measure its VAE's ceiling "
                   "(person PSNR and colourfulness of the oracle renders encoded and decoded)")
    p.add_argument("--ceiling-images", type=int, default=256, help="oracle renders for the VAE ceiling")
    args = p.parse_args(argv)
    for name in ("sheet_rows", "ceiling_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for flag, path in (("--out", args.out), ("--sheet", args.sheet)):
        if path:
            util.check_output_file(path, flag)
    return args


def fidelity(argv=None):
    args = parse_args(argv)
    if args.sheet and not (args.data and args.targets):
        raise UserError("--sheet needs --data (references) and --targets (skeleton maps)")
    from PIL import Image
    man = os.path.join(args.generated, "manifest.csv")
    # every listed image present, listed once, with its source, pid and target (else one line)
    rows = util.read_manifest(args.generated, ("file", "source", "pid", "target_id"))
    masks_dir = args.oracle_masks or os.path.join(args.oracle, "masks")
    have = [r for r in rows if os.path.isfile(os.path.join(args.oracle, r["file"]))]
    if not have:
        raise UserError(f"none of the {len(rows)} images of '{man}' has an oracle render in '{args.oracle}' "
                        f"(make them with 'python demo/oracle.py --manifest {man} ...')")
    if len(have) < len(rows):  # documented: the figures cover the images that have an oracle render
        missing = next(r["file"] for r in rows if not os.path.isfile(os.path.join(args.oracle, r["file"])))
        print(f"warning: {len(rows) - len(have)} of the {len(rows)} images have no oracle render in "
              f"'{args.oracle}' (e.g. '{missing}'): left out, counted as images_without_oracle", file=sys.stderr)

    def load(path, size=None, mode="RGB", resample=Image.BICUBIC):
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if size is not None and im.size != size:
                    im = im.resize(size, resample)
                return np.asarray(im, dtype=np.float64) / 255.0
        except Exception as e:  # a figure over the readable rest would be partial without a word
            raise UserError(f"image '{path}' cannot be read ({type(e).__name__}): delete it and rerun the command "
                            f"that made it (03_generate.py or demo/oracle.py)")

    gen, ora, gmask, omask = {}, {}, {}, {}
    for r in tqdm(have, desc="loading", leave=False):
        gen_img = load(os.path.join(args.generated, r["file"]))
        size = (gen_img.shape[1], gen_img.shape[0])
        ora_img = load(os.path.join(args.oracle, r["file"]), size)
        mask_path = os.path.join(masks_dir, os.path.splitext(os.path.basename(r["file"]))[0] + ".mask.png")
        if os.path.isfile(mask_path):
            ora_mask = load(mask_path, size, "L", Image.NEAREST) > 0.5
        else:
            ora_mask = estimate_mask(ora_img)
        gen[r["file"]], ora[r["file"]] = gen_img, ora_img
        gmask[r["file"]], omask[r["file"]] = estimate_mask(gen_img), ora_mask
    # controls: the same identity's oracle in another target pose (does the sample follow the pose?)
    # and another identity's oracle in the same target pose (does it keep the identity?)
    by_src, by_tgt = {}, {}
    for r in have:
        by_src.setdefault(r["source"], []).append(r)
        by_tgt.setdefault(r["target_id"], []).append(r)
    metrics = {k: [] for k in ("psnr", "psnr_fg", "ssim", "mask_iou", "shuf_psnr", "shuf_psnr_fg", "shuf_iou",
                               "other_psnr", "other_psnr_fg", "other_iou", "gain_pose_iou", "gain_id_psnr_fg",
                               "colour_gen", "colour_ora", "gain_id_psnr_overlap", "overlap_share")}
    for r in tqdm(have, desc="fidelity"):
        file = r["file"]
        metrics["psnr"].append(psnr(gen[file], ora[file]))
        metrics["psnr_fg"].append(psnr(gen[file], ora[file], omask[file]))
        metrics["ssim"].append(ssim(gen[file], ora[file]))
        metrics["mask_iou"].append(iou(gmask[file], omask[file]))
        metrics["colour_gen"].append(colourfulness(gen[file], gmask[file]))
        metrics["colour_ora"].append(colourfulness(ora[file], omask[file]))
        same = [row for row in by_src[r["source"]] if row["target_id"] != r["target_id"]]
        if same:
            control = same[len(metrics["psnr"]) % len(same)]["file"]  # deterministic pick
            metrics["shuf_psnr"].append(psnr(gen[file], ora[control]))
            metrics["shuf_psnr_fg"].append(psnr(gen[file], ora[control], omask[control]))
            metrics["shuf_iou"].append(iou(gmask[file], omask[control]))
            metrics["gain_pose_iou"].append(metrics["mask_iou"][-1] - metrics["shuf_iou"][-1])
        other = [row for row in by_tgt[r["target_id"]] if row["pid"] != r["pid"]]
        if other:
            control = other[len(metrics["psnr"]) % len(other)]["file"]
            metrics["other_psnr"].append(psnr(gen[file], ora[control]))
            metrics["other_psnr_fg"].append(psnr(gen[file], ora[control], omask[control]))
            metrics["other_iou"].append(iou(gmask[file], omask[control]))
            metrics["gain_id_psnr_fg"].append(metrics["psnr_fg"][-1] - metrics["other_psnr_fg"][-1])
            # the same gain only where the generated image and both oracles show a person: what is
            # left when the silhouettes' misalignment (mask IoU) is taken out
            both = gmask[file] & omask[file] & omask[control]
            if both.sum() >= 20:
                metrics["gain_id_psnr_overlap"].append(psnr(gen[file], ora[file], both)
                                                       - psnr(gen[file], ora[control], both))
                metrics["overlap_share"].append(float(both.sum() / max(omask[file].sum(), 1)))
    mean = lambda v: float(np.mean(v)) if v else None
    # paired gains over the controls with a 95% interval: "clearly above" means the interval excludes 0
    ci = lambda v: [float(np.mean(v) - 1.96 * np.std(v) / np.sqrt(len(v))), float(np.mean(v) + 1.96 * np.std(v) / np.sqrt(len(v)))] if len(v) > 1 else None
    res = dict(generated=args.generated, oracle=args.oracle, images=len(have), images_without_oracle=len(rows) - len(have),
               psnr=mean(metrics["psnr"]), psnr_foreground=mean(metrics["psnr_fg"]), ssim=mean(metrics["ssim"]),
               mask_iou=mean(metrics["mask_iou"]),
               control_pose_shuffled=dict(psnr=mean(metrics["shuf_psnr"]), psnr_foreground=mean(metrics["shuf_psnr_fg"]),
                                          mask_iou=mean(metrics["shuf_iou"]), n=len(metrics["shuf_iou"])),
               control_other_identity=dict(psnr=mean(metrics["other_psnr"]), psnr_foreground=mean(metrics["other_psnr_fg"]),
                                           mask_iou=mean(metrics["other_iou"]), n=len(metrics["other_iou"])),
               oracle_masks="files" if os.path.isdir(masks_dir) else "estimated",
               pose_gain_mask_iou=dict(mean=mean(metrics["gain_pose_iou"]), ci95=ci(metrics["gain_pose_iou"])),
               identity_gain_psnr_foreground=dict(mean=mean(metrics["gain_id_psnr_fg"]),
                                                  ci95=ci(metrics["gain_id_psnr_fg"])),
               identity_gain_psnr_overlap=dict(mean=mean(metrics["gain_id_psnr_overlap"]),
                                               ci95=ci(metrics["gain_id_psnr_overlap"]),
                                               share_of_person=mean(metrics["overlap_share"]),
                                               n=len(metrics["overlap_share"])),
               colourfulness=dict(generated=mean(metrics["colour_gen"]), oracle=mean(metrics["colour_ora"])))
    if args.generator:
        pick = [r["file"] for r in have[::max(1, len(have) // args.ceiling_images)][:args.ceiling_images]]
        res["vae_ceiling"] = vae_ceiling(args.generator, [ora[f] for f in pick], [omask[f] for f in pick])
    out = args.out or os.path.join(args.generated, "fidelity.json")
    util.save_json(out, res)
    if args.sheet:
        sample_sheet(args, by_src, gen, ora)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    print(f"{len(have)} images vs oracle: PSNR {fmt(res['psnr'])} dB (person only {fmt(res['psnr_foreground'])}), "
          f"SSIM {fmt(res['ssim'])}, mask IoU {fmt(res['mask_iou'])}")
    for name, key in (("pose shuffled (same identity, other target)", "control_pose_shuffled"),
                      ("other identity (same target pose)", "control_other_identity")):
        c = res[key]
        print(f"  control, {name}: PSNR {fmt(c['psnr'])} (person only {fmt(c['psnr_foreground'])}), mask IoU {fmt(c['mask_iou'])}")
    c = res["colourfulness"]
    print(f"  colourfulness of the person (0 = grey): generated {fmt(c['generated'])}, oracle {fmt(c['oracle'])}")
    if "vae_ceiling" in res:
        v = res["vae_ceiling"]
        print(f"  the generator's VAE alone (oracle encoded + decoded, {v['n']} images): person PSNR "
              f"{fmt(v['psnr_foreground'])} dB, colourfulness {fmt(v['colourfulness'])}")
    for name, key in (("follows the pose: mask IoU - pose-shuffled", "pose_gain_mask_iou"),
                      ("keeps the identity: person PSNR - other identity", "identity_gain_psnr_foreground"),
                      ("the same where the generated image and both oracles show a person", "identity_gain_psnr_overlap")):
        g = res[key]
        if g["ci95"]:
            print(f"  {name}: {g['mean']:+.4f} (95% CI {g['ci95'][0]:+.4f} .. {g['ci95'][1]:+.4f})")
    print(f"wrote {out}")
    return res


def sample_sheet(args, by_src, gen, ora, per_row=4):
    """The picture next to the numbers: references spread over the identities, each followed by
    per_row of its jobs as (target skeleton | generated | oracle), all at the generated size.
    by_src: {reference file name: [manifest rows]}, as fidelity() grouped them for its controls."""
    from PIL import Image
    sources = sorted(by_src)
    pick = [sources[i] for i in np.linspace(0, len(sources) - 1, min(args.sheet_rows, len(sources))).astype(int)]
    h, w = next(iter(gen.values())).shape[:2]
    tile = lambda path, mode="RGB": np.asarray(Image.open(path).convert(mode).resize((w, h), Image.BICUBIC))
    to8 = lambda a: (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    lines = []
    for src in pick:
        cells = [tile(os.path.join(args.data, "bounding_box_train", src))]
        for r in by_src[src][:per_row]:
            cells += [tile(cond_path(os.path.join(args.targets, "maps"), r["target_id"], "skeleton")),
                      to8(gen[r["file"]]), to8(ora[r["file"]])]
        cells += [np.zeros((h, w, 3), np.uint8)] * (1 + 3 * per_row - len(cells))  # pad short rows
        lines.append(np.concatenate(cells, 1))
    util.save_image(args.sheet, np.concatenate(lines, 0))
    print(f"wrote {args.sheet} ({len(lines)} references x {per_row} jobs: skeleton | generated | oracle)")

if __name__ == "__main__":
    util.run_main(fidelity)
