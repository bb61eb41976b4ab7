"""
Can every set of weights a real run will load be had, before the run spends hours on its first
stage? run_all.sh calls this first. Each argument is NAME=ID_OR_FOLDER; a weight counts as there
when its config and weight files are found in a local folder, in the local Hugging Face cache
(HF_HUB_OFFLINE=1), or in the hub's file listing of the repo (online). One line per missing
weight, exit 2; nothing is downloaded.

  python tools/check_weights.py sd15=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      image_encoder=lambdalabs/sd-image-variations-diffusers vitpose=usyd-community/vitpose-base-simple \\
      resnet50=imagenet
"""
import os
import sys
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import util  # noqa: E402

# what each kind needs: (subfolder alternatives, config file, weight file alternatives)
DIFFUSERS_W = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_W = ("model.safetensors", "pytorch_model.bin")
NEEDS = {
    "sd15": [(("unet",), "config.json", DIFFUSERS_W), (("vae",), "config.json", DIFFUSERS_W)],
    # the image-variations repo keeps its CLIP under image_encoder/; a plain CLIP repo at its root
    "image_encoder": [(("", "image_encoder"), "config.json", TRANSFORMERS_W)],
    "vitpose": [(("",), "config.json", TRANSFORMERS_W), (("",), "preprocessor_config.json", None)],
}
FLAGS = {"sd15": "--pretrained", "image_encoder": "--image-encoder", "vitpose": "--vitpose",
         "resnet50": "--backbone-weights"}


def hub_files(repo):
    """-> the set of file paths the hub lists for repo, or None when the hub cannot be asked
    (offline: then the local cache answers per file)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    from huggingface_hub import HfApi
    try:
        return set(HfApi().list_repo_files(repo))
    except Exception as e:  # not found, gated, no network: the first line says which
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def found(source, listing, path):
    """Is `path` (a file inside the repo or folder) there?"""
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, path))
    if listing is not None:
        return path in listing
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(source, path), str)


def missing(kind, source):
    """-> None when `source` holds what `kind` needs, else why not (one clause)."""
    if kind == "resnet50":  # torchvision's ImageNet weights, downloaded by 04 into torch's hub cache
        if source == "none":
            return None
        if source != "imagenet":
            return None if os.path.isfile(source) else "file does not exist"
        import torch
        import torchvision
        url = torchvision.models.get_model_weights("resnet50").IMAGENET1K_V1.url
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if offline and not os.path.isfile(cached):
            return f"not in torch's cache '{cached}' and the run is offline (download {url} there)"
        return None
    local = os.path.isdir(source)
    if not local and (source.startswith(("/", ".", "~")) or source.count("/") != 1):
        return "no such folder, and not a hub id (org/name)"
    listing = None if local else hub_files(source)
    if isinstance(listing, str):
        return f"the hub does not list it ({listing})"
    for subs, config, weights in NEEDS[kind]:
        for sub in subs:
            p = lambda f: f"{sub}/{f}" if sub else f
            if found(source, listing, p(config)) and (weights is None or any(found(source, listing, p(w)) for w in weights)):
                break
        else:
            where = " or ".join(f"{s}/" if s else "the top level" for s in subs)
            how = "" if local or listing is not None else " in the local cache (HF_HUB_OFFLINE=1)"
            return f"no {config}{'' if weights is None else ' + weights'} in {where}{how}"
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", nargs="+", metavar="NAME=ID_OR_FOLDER", help=f"NAME: {', '.join(FLAGS)}")
    args = p.parse_args()
    bad = 0
    for item in args.weights:
        kind, _, source = item.partition("=")
        if kind not in FLAGS or not source:
            raise util.UserError(f"'{item}' is not NAME=ID_OR_FOLDER with NAME one of {', '.join(FLAGS)}")
        why = missing(kind, source)
        if why:
            print(f"error: {FLAGS[kind]} '{source}' cannot be loaded: {why}", file=sys.stderr)
            bad += 1
        else:
            print(f"weights: {FLAGS[kind]} '{source}' found")
    if bad:
        sys.exit(2)


if __name__ == "__main__":
    util.run_main(main)
