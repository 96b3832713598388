"""One model's numbers, each with its paper's definition.

    moments.py      streaming float64 moments; the one definition of kurtosis
    collectors.py   weight rows and the observation hook (activation, attention and paper statistics)
    perplexity.py   evaluation windows, NLL passes, calibration batches
    registry.py     the metric registry: every reported number is one `Metric` (a new metric goes here)
    evaluate.py     measure(): the pieces together into one Measurement (eval.json); evaluate_checkpoint,
                    evaluate_hf (the `eval` verb)
"""
