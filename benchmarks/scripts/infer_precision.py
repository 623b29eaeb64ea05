"""On a GPU: train the paper preset (compiled) on a pack's training split, then compare the test
split's mean lesion Dice of plain fp32 eager inference with the fast path (bf16, and bf16 +
channels-last + compile) on the same checkpoint.  python3 infer_precision.py OUT.json [PACK.npz]"""
import json
import sys
import time

import torch

from busi_monai.data.packs import CachedData, load_pack
from busi_monai.inference.predictor import Predictor
from busi_monai.training.loop import compile_network, fit
from busi_monai.training.validation import image_scores

out = sys.argv[1]
d = load_pack(sys.argv[2] if len(sys.argv) > 2 else ".gpu/busi256.npz")
tr = [i for i, it in enumerate(d.items) if it["split"] == "training"]
te = [i for i, it in enumerate(d.items) if it["split"] == "test"]


def sub(idx):
    return CachedData(d.images[idx], d.labels[idx], [d.items[i] for i in idx])


t = time.time()
s = fit(sub(tr), sub(tr[:0]), "/tmp/paper_run", "paper", device="cuda", progress=False, compile_model=True)
train_s = time.time() - t
test = sub(te)
res = {"train_s": train_s, "train_loop_s": s["train_time_s"]}
for name, amp, comp in (("fp32_eager", False, False), ("bf16_eager", True, False), ("bf16_channels_last_compiled", True, True)):
    p = Predictor("/tmp/paper_run/model.pt", device="cuda", tta=False, amp=amp)
    net = p.averaged
    if comp:
        net = compile_network(net.to(memory_format=torch.channels_last), p.device)
    probs = []
    with torch.no_grad():
        for i in range(0, len(te), 64):
            x = test.images[i:i + 64].cuda()
            if comp:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                probs.append(torch.sigmoid(net(x).float()).cpu())
    prob = torch.cat(probs)
    sc = image_scores(prob, test.labels)
    les = sc["lesion"]
    res[name] = {"lesion_dice": float(sc["dice"][les].mean()), "normal_fp": float(sc["outlined"][~les].float().mean())}
    res.setdefault("_probs", {})[name] = prob
base = res["_probs"].pop("fp32_eager")
for k, v in res.pop("_probs").items():
    res[k]["max_abs_prob_diff_vs_fp32"] = float((v - base).abs().max())
    res[k]["mask_pixels_differing_vs_fp32"] = float(((v > 0.5) != (base > 0.5)).float().mean())
    res[k]["dice_minus_fp32"] = res[k]["lesion_dice"] - res["fp32_eager"]["lesion_dice"]
res["device"] = torch.cuda.get_device_name()
json.dump(res, open(out, "w"), indent=1)
print(json.dumps(res, indent=1))
