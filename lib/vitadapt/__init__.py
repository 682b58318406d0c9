"""vitadapt: adapt pre-trained Vision Transformers to new visual domains.

The package behind the notebooks: data sources, backbones and weight sources, parameter-efficient
methods (ExPLoRA, RLRR, LoRA baselines), self-supervised objectives, the Fabric training loop,
evaluation and the papermill runner. Notebooks stay thin and import from here.
"""

from vitadapt.paths import REPO_ROOT, OUTPUTS

__all__ = ["REPO_ROOT", "OUTPUTS"]
__version__ = "0.1.0"
