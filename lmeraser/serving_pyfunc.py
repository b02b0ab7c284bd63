"""The served model as an MLflow pyfunc, logged as *models from code*: MLflow stores this file and
the serving bundle (backbone, prototypes, prompt index, served prompts, influence overlay), and
loading the model runs this file; nothing is unpickled.

    mlflow.pyfunc.load_model("models:/lmeraser@production").predict(images)  # uint8 (N, H, W)

returns the predicted labels; the bundle is a miniature workspace read by `ServingModel.load`.
"""

from __future__ import annotations

from pathlib import Path

import lmeraser  # noqa: F401 (first: its numerics pins must precede numpy and torch: lmeraser/numerics.py)

# isort: split
import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class LmeraserModel(PythonModel):
    def load_context(self, context) -> None:
        from lmeraser.inference import ServingModel
        from lmeraser.workspace import Workspace

        self.model = ServingModel.load(Workspace(Path(context.artifacts["bundle"])))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.dtype != np.uint8:
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        labels, _ = self.model.predict(images)
        return labels


mlflow.models.set_model(LmeraserModel())
