import os
import sys
from pathlib import Path

# Tests run on CPU (CI and the development machines have no GPU). A GPU run sets it itself.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).parent))
