from pipeline.models.densenet import MODEL_NAMES, DenseNet, build_model

__all__ = ["MODEL_NAMES", "DenseNet", "build_model"]
