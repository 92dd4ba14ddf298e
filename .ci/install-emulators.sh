#!/usr/bin/env bash
# Placeholder until checkpoint-io's emulator suite lands.
set -euo pipefail
