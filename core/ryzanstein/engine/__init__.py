"""Generation: sampling parameters, sampler, incremental detokenizer, the decode loop."""
