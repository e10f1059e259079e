"""`make demo`: flexfeed end to end on a corpus and tiny models made on the spot.

Not part of the flexfeed distribution: it uses pipeline, stages and store, and none of them uses it.
`corpus` writes the embedded multi-domain corpus, `tiny` builds tiny Llama models and tokenizers
(also what the tests and benchmarks train on), `run` does the whole pipeline and writes the report.
"""
