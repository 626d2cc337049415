"""The shared KL divergence helpers: the top-k reference both sensitivity sweeps score probes against."""

from __future__ import annotations

import numpy as np

from edgeft.divergence import TopKReference, kl_divergence, log_softmax


def test_top_k_kld_is_the_full_kld_at_k_vocab_and_a_lower_bound_below_it():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 70, 300)).astype(np.float32) * 3
    probe = ref + rng.standard_normal(ref.shape).astype(np.float32)
    full = [kl_divergence(log_softmax(r), log_softmax(q)) for r, q in zip(ref, probe)]
    for k, check in ((300, "equal"), (16, "below")):
        reference = TopKReference(k)
        for r in ref:
            reference.add(r)
        assert reference.logp[0].shape == (70, k) and (np.diff(reference.logp[0], axis=1) <= 0).all()
        for i, q in enumerate(probe):
            got = reference.kld(i, q)
            if check == "equal":
                np.testing.assert_allclose(got, full[i], rtol=1e-4, atol=1e-5)
            else:
                assert (got <= full[i] + 1e-9).all() and got.mean() > 0.5 * full[i].mean()
        again = TopKReference.from_arrays(
            **{"ids": reference.to_arrays()["topk_ids"], "logp": reference.to_arrays()["topk_logp"]}
        )
        np.testing.assert_array_equal(again.kld(1, probe[1]), reference.kld(1, probe[1]))
