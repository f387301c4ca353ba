#!/bin/sh
# Install the Tether agent on a device: Debian 12+, Ubuntu 23.04+, Raspberry Pi OS bookworm,
# on amd64, arm64 and armhf (32-bit Raspberry Pi OS).
#
# The controller serves this script and the agent (`tether up --http 0.0.0.0:9100`):
#
#   curl -fsSL http://CONTROLLER:9100/install.sh | sudo sh -s -- --token tet_... \
#       [--label site=berlin ...] [--broker URL ...] [--device-id ID] [--driver docker|process] \
#       [--credentials FILE | --username ID --password PW] [--no-index] [--no-start]
#
# The served copy knows where it came from: it installs the agent's wheel of the controller's
# own version from the controller (its SHA-256 checked), the controller's CA if its broker
# uses TLS, and points the agent at the controller's broker unless --broker says otherwise.
# This copy (the repository's) needs --broker and --from PATH (a wheel or a source checkout).
# Nothing is ever installed from the package index under the name tether.
#
# Credentials: `tether devices credentials ID --out ID.json` on the operator's machine, copy
# the file to the device, --credentials ID.json (the password stays off the command line).
#
# What it does (running it again with the same arguments changes nothing but the agent's
# version, which it upgrades):
#   1. python3 >= 3.11 with venv (apt-get installs python3-venv where it is missing) and, with
#      apt-get, Debian's python3-msgpack, python3-nacl and python3-cffi: the package index has
#      no wheels of them for armhf, and a device seldom has a compiler,
#   2. a virtualenv /opt/tether-agent (seeing those system packages) with the agent: the
#      controller's wheel (or --from PATH), its other dependencies from the package index or
#      the controller's wheelhouse (`tether up --wheelhouse DIR`; --no-index: only from there),
#   3. /etc/tether/agent.toml from the arguments (a changed file's old version is kept as
#      agent.toml.bak), checked by the agent's own config loader before it is put in place,
#      and the broker credentials (in agent.toml, or credentials.json in the data dir),
#   4. the systemd unit /etc/systemd/system/tether-agent.service, enabled and (re)started when
#      systemd runs; elsewhere (a container, a chroot) it prints how to start the agent.
set -eu

VENV=/opt/tether-agent
CONFIG_DIR=/etc/tether
CONFIG=$CONFIG_DIR/agent.toml
UNIT_DIR=/etc/systemd/system
UNIT=$UNIT_DIR/tether-agent.service
DATA_DIR=/var/lib/tether-agent
# Debian's builds of the agent's compiled dependencies (see 1. above).
DEBIAN_PYTHON_PACKAGES="python3-msgpack python3-nacl python3-cffi"

# Set by the controller that serves this script (tether up --http); empty in the repository.
served_version=""
served_server=""
served_broker=""
served_wheel_url=""
served_wheel_sha256=""
served_ca_url=""
served_ca_sha256=""
served_find_links=""

brokers=""
labels=""
token=""
username=""
password=""
credentials=""
driver=docker
device_id=""
from=""
no_index=no
start=yes
nl='
'

say() { printf 'install-agent: %s\n' "$*"; }
die() { printf 'install-agent: error: %s\n' "$*" >&2; exit 1; }

usage() {
    if [ -n "$served_server" ]; then
        printf 'Usage: curl -fsSL %s/install.sh | sudo sh -s -- [options]\n' "$served_server"
        printf '  (installs tether-agent %s from %s)\n' "$served_version" "$served_server"
    else
        echo "Usage: install-agent.sh --broker URL --from PATH [options]"
    fi
    cat <<'EOF'
  --broker URL         MQTT broker, mqtt://host:1883 or mqtts://host:8883 (repeat for fallbacks;
                       default: the broker of the controller that served this script)
  --label KEY=VALUE    a device label (repeatable)
  --device-id ID       the device id (default: the host name, read when the agent starts)
  --driver NAME        docker (default) or process
  --username USER      the device's broker credentials, from `tether devices credentials ID`
  --password PASS      (the username is the device id); written to agent.toml (0600)
  --credentials FILE   the same as a file, from `tether devices credentials ID --out FILE`;
                       copied to the data dir as credentials.json (0600)
  --token TOKEN        a fleet enrollment token (tether tokens create): the device enrolls
                       with it and waits for approval
  --data-dir DIR       the agent's state (default /var/lib/tether-agent; the systemd unit's
                       ReadWritePaths= must be changed to match in a drop-in)
  --from PATH          install the agent from a wheel or a source directory (default: the
                       wheel of the controller that served this script)
  --no-index           dependencies only from the controller's wheelhouse and Debian's packages
  --no-start           enable the service but do not start it now (e.g. for a golden image)
EOF
}

usage_error() {
    printf 'install-agent: error: %s\n' "$1" >&2
    usage >&2
    exit 2
}

# Everything runs inside main, called on the last line: `curl ... | sh` then has read the
# whole script before anything runs, so a command reading standard input cannot swallow the
# rest of it, and a download cut short runs nothing.
main() {

# --- arguments -----------------------------------------------------------------------------
while [ $# -gt 0 ]; do
    opt=$1
    case $opt in
        --*=*) value=${opt#*=}; opt=${opt%%=*}; shift ;;
        --no-start | --no-index | -h | --help) value="" ; shift ;;
        --*)
            [ $# -ge 2 ] || usage_error "$opt needs a value"
            value=$2
            shift 2
            ;;
        *) usage_error "unexpected argument: $opt" ;;
    esac
    case $value in *"$nl"*) usage_error "$opt: the value spans lines" ;; esac
    case $opt in
        --broker) brokers="$brokers$value$nl" ;;
        --label)
            case $value in
                ?*=*) labels="$labels$value$nl" ;;
                *) usage_error "--label $value: expected KEY=VALUE" ;;
            esac
            ;;
        --token) token=$value ;;
        --username) username=$value ;;
        --password) password=$value ;;
        --credentials) credentials=$value ;;
        --driver)
            case $value in
                docker | process) driver=$value ;;
                *) usage_error "--driver must be docker or process, not '$value'" ;;
            esac
            ;;
        --device-id) device_id=$value ;;
        --data-dir) DATA_DIR=$value ;;
        --from) from=$value ;;
        --no-index) no_index=yes ;;
        --no-start) start=no ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option: $opt" ;;
    esac
done
[ -n "$brokers" ] || [ -z "$served_broker" ] || brokers="$served_broker$nl"
[ -n "$brokers" ] || usage_error "at least one --broker is needed"
if [ -n "$username" ] || [ -n "$password" ]; then
    [ -n "$username" ] && [ -n "$password" ] || usage_error "--username and --password go together"
    [ -z "$credentials" ] || usage_error "--credentials or --username/--password, not both"
fi
[ -n "$from" ] || [ -n "$served_wheel_url" ] ||
    usage_error "--from PATH is needed (or run the script your controller serves: curl -fsSL http://CONTROLLER:9100/install.sh | sudo sh -s -- ...)"
[ "$(id -u)" = 0 ] || die "run as root (curl ... | sudo sh -s -- ...)"
if [ -n "$from" ]; then
    [ -e "$from" ] || die "--from $from: no such file or directory"
    case $from in /*) ;; *) from=$(cd "$(dirname "$from")" && pwd)/$(basename "$from") ;; esac
fi

# --- Python ----------------------------------------------------------------------------------
# The first python3 (or python3.X) that is >= 3.11.
find_python() {
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

has_venv() { "$1" -c 'import venv, ensurepip' >/dev/null 2>&1; }

apt_install() {
    command -v apt-get >/dev/null 2>&1 || return 1
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

python=$(find_python || true)
if [ -z "$python" ]; then
    apt_install python3 python3-venv || true
    python=$(find_python || true)
    # Ubuntu 22.04: python3 is 3.10, python3.11 is in universe.
    [ -n "$python" ] || { apt_install python3.11 python3.11-venv || true; python=$(find_python || true); }
    [ -n "$python" ] || die "Python >= 3.11 is needed (found: $(python3 -V 2>&1 || echo none))"
fi
if ! has_venv "$python"; then
    # Debian and its derivatives ship venv/ensurepip apart: python3-venv (or python3.X-venv).
    name=$(basename "$python")
    apt_install "$name-venv" || true
    has_venv "$python" || die "$python has no venv module (install the package $name-venv)"
fi
say "using $("$python" -V 2>&1) ($python)"
system_site=no
if command -v apt-get >/dev/null 2>&1 && [ "$python" = "$(command -v python3)" ]; then
    missing=""
    for pkg in $DEBIAN_PYTHON_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $pkg"
    done
    # shellcheck disable=SC2086 # a list of package names
    [ -z "$missing" ] || apt_install $missing || die "apt-get install$missing failed"
    system_site=yes
fi

# --- the agent -------------------------------------------------------------------------------
venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        return 1
    site=$(sed -n 's/^include-system-site-packages *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null)
    [ "$system_site" = no ] || [ "$site" = true ]
}
if venv_ok; then
    say "reusing the virtualenv $VENV"
else
    say "creating the virtualenv $VENV"
    if [ "$system_site" = yes ]; then
        "$python" -m venv --clear --system-site-packages "$VENV"
    else
        "$python" -m venv --clear "$VENV"
    fi
fi
pip_install() {
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$@" </dev/null
}
set --
[ -z "$served_find_links" ] || set -- --find-links "$served_find_links"
[ "$no_index" = no ] || set -- "$@" --no-index

# download URL FILE SHA256: the file, only if its SHA-256 is the one expected.
download() {
    "$VENV/bin/python" -c '
import hashlib, sys, urllib.request
url, path, expected = sys.argv[1:4]
try:
    with urllib.request.urlopen(url, timeout=120) as answer:
        data = answer.read()
except OSError as exc:
    sys.exit(f"cannot download {url}: {exc}")
actual = hashlib.sha256(data).hexdigest()
if actual != expected:
    sys.exit(f"{url}: SHA-256 {actual}, expected {expected}: not installing it")
with open(path, "wb") as f:
    f.write(data)
' "$1" "$2" "$3" </dev/null
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "$from" ]; then
    source=$from
    say "pip install $source"
    pip_install --upgrade "$@" "$source" || die "pip install $source failed"
else
    source=$work/${served_wheel_url##*/}
    say "downloading tether-agent $served_version from $served_server"
    error=$(download "$served_wheel_url" "$source" "$served_wheel_sha256" 2>&1) || die "$error"
    say "SHA-256 checked: $served_wheel_sha256"
    pip_install --upgrade "$@" "$source" || die "pip install ${source##*/} failed"
    # Same version number, other code (a development build): the checksum tells.
    if [ "$(cat "$VENV/.tether-wheel.sha256" 2>/dev/null)" != "$served_wheel_sha256" ]; then
        pip_install --no-deps --force-reinstall "$source" || die "pip install ${source##*/} failed"
        echo "$served_wheel_sha256" >"$VENV/.tether-wheel.sha256"
    fi
fi
version=$("$VENV/bin/tether-agent" --version 2>&1) || die "$VENV/bin/tether-agent does not run: $version"
version=${version##* }
if [ -n "$served_version" ] && [ -z "$from" ] && [ "$version" != "$served_version" ]; then
    die "installed tether-agent $version, but the controller runs $served_version"
fi
say "installed tether-agent $version"
ln -sf "$VENV/bin/tether-agent" /usr/local/bin/tether-agent

# --- the controller's CA (its broker uses TLS) ------------------------------------------------
ca_file=""
if [ -n "$served_ca_url" ] && printf '%s' "$brokers" | grep -q '^mqtts://'; then
    mkdir -p "$CONFIG_DIR"
    error=$(download "$served_ca_url" "$work/ca.pem" "$served_ca_sha256" 2>&1) || die "$error"
    if cmp -s "$work/ca.pem" "$CONFIG_DIR/ca.pem"; then
        say "$CONFIG_DIR/ca.pem unchanged"
    else
        install -m 0644 "$work/ca.pem" "$CONFIG_DIR/ca.pem"
        say "installed the controller's CA as $CONFIG_DIR/ca.pem (SHA-256 checked)"
    fi
    ca_file=$CONFIG_DIR/ca.pem
fi

# --- credentials -----------------------------------------------------------------------------
# A device's broker username is its id: it names the device when --device-id does not.
if [ -n "$credentials" ]; then
    [ -f "$credentials" ] || die "--credentials $credentials: no such file"
    username_in_file=$("$VENV/bin/python" -c '
import json, sys
data = json.load(open(sys.argv[1]))
assert isinstance(data["username"], str) and isinstance(data["password"], str) and data["username"]
print(data["username"])
' "$credentials" 2>/dev/null) || die "--credentials $credentials: not a credentials file (JSON with username and password)"
fi
for user in "$username" "${username_in_file:-}"; do
    [ -n "$user" ] || continue
    [ -n "$device_id" ] || device_id=$user
    [ "$device_id" = "$user" ] || die "the credentials are for device '$user', not '$device_id'"
done

# --- the configuration -----------------------------------------------------------------------
toml_string() {
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"
}

write_config() {
    echo "# The Tether agent's configuration, written by install-agent.sh; running it again"
    echo "# rewrites this file. Every key: agent/config.py in the Tether sources (flags of"
    echo "# tether-agent --help, as keys); unknown keys are errors."
    printf 'brokers = ['
    sep=""
    printf '%s' "$brokers" | while IFS= read -r url; do
        printf '%s%s' "$sep" "$(toml_string "$url")"
        sep=", "
    done
    printf ']\n'
    if [ -n "$device_id" ]; then
        printf 'device_id = %s\n' "$(toml_string "$device_id")"
    else
        echo '# device_id = "..."   # default: the host name'
    fi
    printf 'driver = %s\n' "$(toml_string "$driver")"
    printf 'data_dir = %s\n' "$(toml_string "$DATA_DIR")"
    [ -z "$ca_file" ] || printf 'ca_file = %s\n' "$(toml_string "$ca_file")"
    if [ -n "$username" ]; then
        echo "# Broker credentials (\`tether devices credentials $username\`)."
        printf 'username = %s\n' "$(toml_string "$username")"
        printf 'password = %s\n' "$(toml_string "$password")"
    elif [ -n "$credentials" ]; then
        echo "# Broker credentials: $DATA_DIR/credentials.json."
    fi
    echo
    if [ -n "$token" ]; then
        echo "# Fleet enrollment token (tether tokens create): used only while the device has no"
        echo "# credentials; the device then waits for approval (docs/onboarding.md)."
        printf 'enrollment_token = %s\n' "$(toml_string "$token")"
    fi
    echo
    echo "[labels]"
    printf '%s' "$labels" | while IFS= read -r label; do
        printf '%s = %s\n' "$(toml_string "${label%%=*}")" "$(toml_string "${label#*=}")"
    done
}

mkdir -p "$CONFIG_DIR"
chmod 0755 "$CONFIG_DIR"
new=$(mktemp "$CONFIG_DIR/.agent.toml.XXXXXX")
trap 'rm -f "$new"; rm -rf "$work"' EXIT
write_config >"$new"
chmod 0600 "$new"
# The agent's own loader checks it (unknown keys, broker URLs, labels, device id).
if ! check=$("$VENV/bin/python" -c '
import sys
from pathlib import Path
from tether.agent.config import load_config
from tether.protocol.errors import ConfigError
try:
    config = load_config(Path(sys.argv[1]), {}, {})
except ConfigError as exc:
    sys.exit(str(exc).replace(sys.argv[1], sys.argv[2]))
print(config.device_id)
' "$new" "$CONFIG" 2>&1); then
    die "the configuration is not valid: $check"
fi
if [ -f "$CONFIG" ] && cmp -s "$new" "$CONFIG"; then
    say "$CONFIG unchanged (device $check)"
    rm -f "$new"
else
    [ -f "$CONFIG" ] && cp -p "$CONFIG" "$CONFIG.bak" && say "kept the previous $CONFIG as $CONFIG.bak"
    mv "$new" "$CONFIG"
    say "wrote $CONFIG (device $check)"
fi
trap 'rm -rf "$work"' EXIT
mkdir -p "$DATA_DIR"
chmod 0700 "$DATA_DIR"
if [ -n "$credentials" ]; then
    if cmp -s "$credentials" "$DATA_DIR/credentials.json"; then
        say "$DATA_DIR/credentials.json unchanged"
    else
        install -m 0600 "$credentials" "$DATA_DIR/credentials.json"
        say "installed the broker credentials as $DATA_DIR/credentials.json"
    fi
fi

if [ "$driver" = docker ] && ! command -v docker >/dev/null 2>&1 && [ ! -S /var/run/docker.sock ]; then
    say "warning: Docker was not found. Install it (apt-get install docker.io, or Docker's own"
    say "packages) or use --driver process: until the engine answers, the agent exits and"
    say "systemd starts it again."
fi

# --- the service -----------------------------------------------------------------------------
mkdir -p "$UNIT_DIR"
unit_new=$(mktemp "$UNIT_DIR/.tether-agent.service.XXXXXX")
cat >"$unit_new" <<'UNIT'
# The Tether device agent. Installed by packaging/install-agent.sh, which keeps a copy of
# this file (tests/test_install_script.py checks that the two are the same).
# Settings: /etc/tether/agent.toml (brokers, device_id, labels, driver, data_dir).
# Local changes: `systemctl edit tether-agent` (a drop-in), not this file.
[Unit]
Description=Tether device agent
Wants=network-online.target
# After docker.service, not Requires=: with the process driver there is no Docker, and with
# the docker driver an agent started before the engine answers exits and is restarted.
After=network-online.target docker.service
# Never give up restarting (an edge device has nobody to run `systemctl reset-failed`).
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart=/opt/tether-agent/bin/tether-agent --config /etc/tether/agent.toml
Environment=PYTHONUNBUFFERED=1
# Restart whatever the exit, backing off from 5 s to 60 s between attempts
# (RestartSteps/RestartMaxDelaySec need systemd >= 254; older ones ignore them with a
# warning and restart every RestartSec).
Restart=always
RestartSec=5
RestartSteps=10
RestartMaxDelaySec=60
# SIGTERM: the agent publishes "offline" and disconnects cleanly.
TimeoutStopSec=30
# Only the agent is stopped: process-driver services run in their own sessions so that they
# outlive an agent restart (an upgrade), and the restarted agent re-attaches to them, as
# Docker containers outlive it with the docker driver.
KillMode=process

# --- Hardening --------------------------------------------------------------------------
# The agent runs as root: with the docker driver it controls the Docker engine, which is
# root on this host whatever the agent's own user (a `tether` user in the docker group is
# no less powerful), and process-driver services may need root. The options below limit
# what the agent process itself (and process-driver services, which inherit them) can do.
# Docker containers are started by dockerd and are not affected.
StateDirectory=tether-agent
StateDirectoryMode=0700
ProtectSystem=strict
# The data dir (data_dir in agent.toml; change both together). The Docker socket needs no
# entry: connecting to a socket is allowed on a read-only mount, and listing it here would
# bind the socket file that existed at start, which goes stale when dockerd restarts.
ReadWritePaths=/var/lib/tether-agent
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
UMask=0027
# Left out on purpose:
# - User=/DynamicUser=: see above; DynamicUser also implies options the process driver
#   cannot live with.
# - PrivateDevices=: process-driver services on edge devices use serial ports, GPIO, I2C
#   and cameras under /dev.
# - PrivateNetwork=, IPAddressDeny=: the agent needs the broker, and process-driver
#   services share the host network (network_mode: host).
# - CapabilityBoundingSet=, SystemCallFilter=: process-driver services run arbitrary
#   programs (binding ports below 1024, changing users, ...); a filter would kill them with
#   SIGSYS in ways hard to diagnose. Tighten them in a drop-in for docker-driver-only
#   devices, e.g. CapabilityBoundingSet= (empty) and SystemCallFilter=@system-service.
# - MemoryDenyWriteExecute=: breaks JIT runtimes (Node.js, Java, LuaJIT) that
#   process-driver services may use.
# - RestrictNamespaces=, PrivateUsers=, ProtectProc=: would break process-driver services
#   that sandbox themselves, and the agent reads /proc of the processes it supervises.

[Install]
WantedBy=multi-user.target
UNIT
chmod 0644 "$unit_new"
if [ -f "$UNIT" ] && cmp -s "$unit_new" "$UNIT"; then
    rm -f "$unit_new"
else
    mv "$unit_new" "$UNIT"
    say "installed $UNIT"
fi
if [ "$DATA_DIR" != /var/lib/tether-agent ]; then
    say "note: data_dir is $DATA_DIR: allow it in the unit with \`systemctl edit tether-agent\`:"
    say "  [Service]"
    say "  ReadWritePaths=$DATA_DIR"
fi

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable --quiet tether-agent.service
    if [ "$start" = yes ]; then
        systemctl restart tether-agent.service
        say "tether-agent is $(systemctl is-active tether-agent.service || true); logs: journalctl -u tether-agent -f"
    else
        say "tether-agent is enabled; it starts at the next boot (or: systemctl start tether-agent)"
    fi
else
    say "systemd is not running here, so the service was installed but not enabled or started."
    say "Start the agent by hand (or from your init system):"
    say "  $VENV/bin/tether-agent --config $CONFIG"
    say "or, once booted with systemd: systemctl enable --now tether-agent"
fi
}

main "$@"
