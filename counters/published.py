"""Figures published in third-party documents about Llama-2 that users quote, kept as data so the
CLI can print them next to ours and the errata tests can check every one.

They are quoted as printed, errors included; ``docs/errata.md`` says which are wrong and why. The
documents are cited in :data:`REFERENCES` by title, authors and URL; where a document names no
author or address and none could be found, the entry says None instead of guessing.
"""

from __future__ import annotations

#: number -> (title, authors, URL) of each document, the title as the document prints it. The numbers are the
#: ones docs/errata.md uses. None: the document does not say, and it could not be found published elsewhere.
REFERENCES: dict[str, tuple[str, str | None, str | None]] = {
    "000": ("Llama2 specifications", None, None),  # a layer-skipping study's "MACs per config" for Llama-2-7B
    "001": ("Calculating the Total Number of Parameters in Llama 2", None, None),
    "002": ("LLaMA-2/3 Model Support", "Jench2103 (Transformer Roofline Analyzer)",
            "https://github.com/Jench2103/transformer-roofline-analyzer/blob/"
            "96b5b2b54a8b298a2fcf36b86abc2babc670493e/docs/llama.md"),
    "003": ("Model Architecture", None, None),  # "Dense Models, Llama 1,2,3": the family overview table
    "004": ("LLama 2 Architecture", None, None),  # notes on RoPE, RMSNorm, KV cache, GQA
}


# Reference 000 (a layer-skipping study, Llama-2-7B): "MACs" = a*N + b*N^2 per configuration.
# key: our schedule preset name -> (label in the document, a, b)
REF000_SOURCE = "reference 000 (layer-skipping study), 'MACs per config' for Llama-2-7B"
REF000_MACS: dict[str, tuple[str, int, int]] = {
    "baseline": ("baseline", 8_882_726_776, 262_144),
    "skip-24-26": ("0-23_27-32", 8_089_532_288, 237_568),
    "skip-15": ("15_single_skip", 8_595_077_304, 253_952),
    "mid-expansion-with-repeats": ("mid_expansion_with_repeats (29)", 8_089_532_288, 237_568),
    "two-thirds": ("2/3rds of llama (22)", 6_185_271_872, 180_224),
    "two-thirds-plus": ("2/3rds of llama plus (27)", 7_534_650_056, 221_184),
    "skip-near-end-keep-last-two": ("skip_near_end_keep_last_two (29)", 8_089_532_288, 237_568),
}

# Reference 001 (a derivation of Llama-2-70B's parameter count), as printed.
REF001_PARAMS = {
    "embedding": 262_144_000,
    "attention_per_layer": 268_435_456,  # 4 x 8192 x 8192: k and v taken as 8192 x 8192 (GQA ignored)
    "ffn_first_per_layer": 470_810_624,  # printed as 8,192 x 57,344 (which is 469,762,048)
    "ffn_second_per_layer": 235_405_312,  # printed as 28,672 x 8,192 (which is 234,881,024)
    "ffn_per_layer": 706_215_936,
    "block_per_layer": 974_651_392,
    "blocks_total": 77_972_111_360,
    "grand_total": 78_234_255_360,
    "rmsnorm_total": 1_310_720,
    "adjusted_total": 78_235_566_080,
}
