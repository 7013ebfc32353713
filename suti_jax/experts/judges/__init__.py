"""Subject and text fidelity judges: small CNNs trained on the synthetic world.

They stand in for DINO/CLIP scores in the pipeline's fidelity filter and the demo's
evaluation, with the advantage that their accuracy can be measured exactly. `models`
holds the judges (scoring, save/load); `training` trains them.
"""

from suti_jax.experts.judges.models import ATTRIBUTES
from suti_jax.experts.judges.models import ImageEncoder
from suti_jax.experts.judges.models import JudgeConfig
from suti_jax.experts.judges.models import prompt_attributes
from suti_jax.experts.judges.models import scene_attributes
from suti_jax.experts.judges.models import SubjectJudge
from suti_jax.experts.judges.models import TextJudge
from suti_jax.experts.judges.training import train_judges
