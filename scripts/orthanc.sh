#!/usr/bin/env bash
# Orthanc (Debian's orthanc + orthanc-dicomweb) as the PACS of a samfewshot server, for loopback clients only.
#
#   scripts/orthanc.sh start DIR [HTTP_PORT]   storage, index, config and log under DIR (default port 8042)
#   scripts/orthanc.sh stop DIR
#   scripts/orthanc.sh status DIR              prints the DICOMweb root and exits 0 when it answers
#
# DICOMweb root: http://127.0.0.1:PORT/dicom-web (serve it with --studies). Orthanc has no listen-address
# setting: RemoteAccessAllowed=false makes it refuse every client that is not on this machine, and the DICOM
# (DIMSE) port is off. Install the packages with scripts/setup.sh (as root) or `apt-get install orthanc
# orthanc-dicomweb`.
set -euo pipefail

usage() { sed -n '2,8p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
command="$1"
dir="$(mkdir -p "$2" && cd "$2" && pwd)"
pidfile="$dir/orthanc.pid"
portfile="$dir/orthanc.port"

plugin_dir() {
  for d in /usr/share/orthanc/plugins /usr/lib/orthanc/plugins; do
    if [ -f "$d/libOrthancDicomWeb.so" ]; then echo "$d"; return 0; fi
  done
  echo "orthanc.sh: the DICOMweb plugin is missing (apt-get install orthanc-dicomweb)" >&2
  return 1
}

answers() { curl -sf -o /dev/null "http://127.0.0.1:$1/dicom-web/studies"; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "$command" in
  start)
    port="${3:-8042}"
    command -v Orthanc >/dev/null || { echo "orthanc.sh: Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)" >&2; exit 1; }
    if running; then echo "orthanc.sh: already running (pid $(cat "$pidfile"), port $(cat "$portfile"))" >&2; exit 1; fi
    plugins="$(plugin_dir)"
    mkdir -p "$dir/storage"
    cat > "$dir/orthanc.json" <<EOF
{
  "Name": "samfewshot",
  "StorageDirectory": "$dir/storage",
  "IndexDirectory": "$dir/storage",
  "HttpPort": $port,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "HttpTimeout": 60,
  "StableAge": 5,
  "OverwriteInstances": true,
  "Plugins": ["$plugins/libOrthancDicomWeb.so"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado", "Ssl": false, "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
}
EOF
    Orthanc "$dir/orthanc.json" > "$dir/orthanc.log" 2>&1 &
    echo $! > "$pidfile"
    echo "$port" > "$portfile"
    for _ in $(seq 1 60); do
      if answers "$port"; then echo "http://127.0.0.1:$port/dicom-web"; exit 0; fi
      if ! running; then echo "orthanc.sh: Orthanc exited; log:" >&2; tail -20 "$dir/orthanc.log" >&2; rm -f "$pidfile"; exit 1; fi
      sleep 0.5
    done
    echo "orthanc.sh: Orthanc did not answer on port $port within 30 s; log: $dir/orthanc.log" >&2
    exit 1
    ;;
  stop)
    if running; then
      pid="$(cat "$pidfile")"
      kill "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    ;;
  status)
    if running && answers "$(cat "$portfile")"; then
      echo "http://127.0.0.1:$(cat "$portfile")/dicom-web (pid $(cat "$pidfile"))"
    else
      echo "orthanc.sh: not running" >&2
      exit 1
    fi
    ;;
  *) usage ;;
esac
