"""The input pipeline: sources, global example order, augmentation, batches.

    from input_pipeline import train_batches, eval_batches
    with train_batches(config, plan, start_examples=x,
                       process_index=p, process_count=P) as batches:
      for batch in batches:  # image, label, examples_seen, step
        ...
"""
from input_pipeline.batches import check_sources
from input_pipeline.batches import eval_batches
from input_pipeline.batches import train_batches
from input_pipeline.errors import DataError
from input_pipeline.sources import Source
from input_pipeline.sources import eval_source
from input_pipeline.sources import make_source
from input_pipeline.sources import train_source

__all__ = ["DataError", "Source", "check_sources", "eval_batches",
           "eval_source", "make_source", "train_batches", "train_source"]
