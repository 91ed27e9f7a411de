"""``mtkd-fast demo``: the main job on the bundled data.

Until the trainer, cache and bundled data land, this runs the smallest real thing that exists: one MTKD-RL
step's maths (reference implementation) on a synthetic batch, printing each quantity of spec sections 2-6.
"""

import torch


def register(sub):
    p = sub.add_parser("demo", help="run the demo (currently: one MTKD-RL step of the reference maths)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args):
    import mtkd_fast
    from mtkd_fast import reference as ref

    info = mtkd_fast.build_info()
    print(f"mtkd_fast {mtkd_fast.__version__}: extension loaded={info['extension_loaded']}, "
          f"CUDA compiled={info.get('cuda_compiled')}, CPU kernels={info['cpu_kernels']}")
    g = torch.Generator().manual_seed(args.seed)
    B, K, M = args.batch, args.classes, args.teachers
    zs = torch.randn(B, K, generator=g)
    zt = torch.randn(M, B, K, generator=g) * 2
    y = torch.randint(0, K, (B,), generator=g)
    maps_s = [torch.randn(B, 4 * (m + 1), 4, 4, generator=g) for m in range(M)]
    maps_t = [torch.randn_like(s) for s in maps_s]
    emb = [t.mean(dim=(2, 3)) for t in maps_t]
    kl = ref.kl_per_sample(zs, zt)
    tce = ref.teacher_cross_entropy(zt, y)
    cos = ref.pooled_cosine(maps_s, emb)
    uniform = torch.full((B, M), 1.0 / M)
    wl, wf = ref.action(uniform, uniform, tce, kl, cos)
    logit = ref.mtkd_logit_kd(zs, zt, y, wl)
    feat = ref.mtkd_feature_kd(maps_s, maps_t, wf)
    per_sample = ref.per_sample_loss(logit.student_ce, logit.kl, wl, feat.mse, wf)
    reward = ref.normalized_reward(per_sample)
    print(f"batch B={B}, classes K={K}, teachers M={M}")
    print(f"loss = {float(logit.loss + feat.loss):.4f} (logit part {float(logit.loss):.4f}, feature part {float(feat.loss):.4f})")
    print("mean logit weights per teacher:  ", [round(float(v), 4) for v in wl.mean(0)])
    print("mean feature weights per teacher:", [round(float(v), 4) for v in wf.mean(0)])
    print("normalised reward:", [round(float(v), 3) for v in reward])
    return 0
