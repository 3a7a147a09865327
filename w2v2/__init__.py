"""w2v2: wav2vec 2.0 end to end — pretrain, fine-tune, transcribe, extract representations."""

from .checkpoint import CheckpointError, load_model, save_pretrained
from .config import ModelConfig
from .embed import Embedding, embed
from .model import ModelOutput, Wav2Vec2, build_model
from .vocab import Vocabulary

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Embedding", "embed", "ModelConfig", "ModelOutput", "Vocabulary", "Wav2Vec2", "build_model",
           "load_model", "save_pretrained", "__version__"]
