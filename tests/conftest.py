import sys
from pathlib import Path

# ``helpers`` holds the tiny models and data the tests share.
sys.path.insert(0, str(Path(__file__).parent))
