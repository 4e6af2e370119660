"""Reading trained models: evaluation, routing statistics, the routing probe, run comparison, sampling."""
