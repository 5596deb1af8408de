import json, sys, time, torch
torch.set_num_threads(1)
from guard_fast.runtime import load_classifier
from guard_fast.data import fixed_subset, get_data
from guard_fast.pipeline import eval_protocol
from guard_fast.evaluate import robust_eval
N = 1000
for name, path in [a.split("=", 1) for a in sys.argv[1:]]:
    t0 = time.time()
    student, arch = load_classifier(path)
    student.eval()
    data = get_data(arch.get("data", "mnist"), image_size=arch["image_size"])
    val = fixed_subset(data.val, N, 0)
    res = robust_eval(student, val, protocol=eval_protocol("paper-code", 500), eps=8 / 255,
                      batch_size=250, attacks=["PGD100", "AutoAttack"],
                      seed=0, progress=False)
    res["seconds"] = time.time() - t0
    res["n"] = len(val[1]); res["student"] = path
    json.dump(res, open(f"/tmp/bigeval/{name}.json", "w"), indent=1, default=str)
    print(name, res["clean"], {k: v for k, v in res["attacks"].items()}, f"{res['seconds']:.0f}s", flush=True)
