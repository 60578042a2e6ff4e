# Sourced by run_tests.sh and demo.sh: creates (once) a virtual environment with requirements.txt
# and activates it. The environment lives outside the clone, keyed by the requirements' hash, so
# fresh clones on the same machine reuse it. Override its place with SRA_VENV=/path.
req_hash=$(sha1sum requirements.txt | cut -c1-12)
SRA_VENV=${SRA_VENV:-$HOME/.cache/sra-venv-$req_hash}
if [ ! -f "$SRA_VENV/.complete" ]; then
  echo "setting up $SRA_VENV (first run only)"
  python3.11 -m venv "$SRA_VENV" || python3 -m venv "$SRA_VENV" || return 1
  "$SRA_VENV/bin/pip" install -q -r requirements.txt || return 1
  touch "$SRA_VENV/.complete"
fi
source "$SRA_VENV/bin/activate"
