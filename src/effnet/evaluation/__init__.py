"""After training: metrics, figures, the HTML report and class activation maps."""

from effnet.evaluation.evaluate import evaluate, run_eval
from effnet.evaluation.metrics import classification_metrics
from effnet.evaluation.report import write_report

__all__ = ["classification_metrics", "evaluate", "run_eval", "write_report"]
