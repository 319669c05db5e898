# shellcheck shell=bash
# shellcheck disable=SC2154 # D, API_PORT, bin, node_bin, here, cache_root come from e2e/cluster
# shellcheck disable=SC2034 # RN_SVC_API_IP and RN_POD_CIDR are used by e2e/cluster too
# The real test node of `e2e/cluster up --real-node`: sourced by e2e/cluster, which provides
# D (the cluster dir), API_PORT, bin (control plane binaries), log, start, wait_for, free_port.
#
# What runs (all host processes, each in its own process group, pids in $D/pids):
#   docker-registry (127.0.0.1:<port>)  the only place containerd pulls from, for every registry name
#   containerd + runc                   CRI runtime, root/state/socket under $D/containerd
#   coredns (10.88.0.1:53)              cluster.local + reverse zones only, no forwarding
#   socat (10.88.0.1:6443)              pods reach the apiserver (bound to 127.0.0.1) through it
#   kubelet (node real-node-0)          node IP 10.88.0.1, root-dir $D/kubelet
#   kube-proxy (iptables mode)          ClusterIPs of 10.96.0.0/16
#
# Nothing leaves the machine:
#   - the only non-loopback ranges are 10.88.0.0/16 (pods, on the bridge rayop0 that we create, with no
#     uplink) and 10.96.0.0/16 (Services, never on any interface); both get blackhole routes BEFORE
#     anything starts, so while the bridge is down or a piece is starting nothing routes off the machine;
#   - pods get routes to 10.88.0.0/16 and 10.96.0.0/16 only (no default route), the host forwards only
#     packets that arrive on rayop0 (net.ipv4.conf.rayop0.forwarding) and the RAYOP-FWD chain drops any
#     forwarded packet that would enter or leave through another interface;
#   - every node process runs in the cgroup v2 group RN_CGROUP, whose outgoing packets the RAYOP-EGRESS
#     chain rejects unless they go to 127.0.0.0/8, 10.88.0.0/16 or 10.96.0.0/16: a pull of an image
#     under a registry name we did not mirror fails locally instead of resolving and dialing it;
#   - the registry mirror for docker.io, ghcr.io, registry.k8s.io, quay.io and `_default` is the local
#     registry; CoreDNS has no `forward` plugin and pods get an empty resolv.conf as upstream.
#
# One real node per machine: it owns the bridge name, 10.88.0.1:53/6443/10250 and kube-proxy's KUBE-*
# iptables chains. $cache_root/real-node-dir records the running one.

RN_BRIDGE=rayop0
RN_POD_CIDR=10.88.0.0/16
RN_GW=10.88.0.1
RN_SVC_CIDR=10.96.0.0/16
RN_SVC_API_IP=10.96.0.1
RN_NODE=real-node-0
RN_CGROUP=/sys/fs/cgroup/unified/ray-operator-real-node
RN_LOCK="$cache_root/real-node-dir"
RN_REGISTRY_STORE="$cache_root/node-registry"
# Where the images live in the registry (the path a pull of the given name asks the mirror for).
RN_PAUSE_REF=registry.k8s.io/pause:3.10
RN_RAY_REF=docker.io/rayproject/ray:nightly
RN_OPERATOR_REF=ghcr.io/ray-operator/ray-operator:0.1.0
RN_BUSYBOX_REF=docker.io/library/busybox:ray-operator-test

rn_elapsed() { python3 -c "print(round($(date +%s.%N) - $1, 1))"; }

# The path a reference has in the mirror: containerd asks a mirror of docker.io for
# /v2/library/<x> for single-segment names, and for the repository path otherwise.
rn_repo_path() {
  local ref=$1 host rest
  host=${ref%%/*}; rest=${ref#*/}
  if [[ "$host" == "$ref" || ( "$host" != *.* && "$host" != *:* ) ]]; then rest=$ref; fi
  echo "$rest"
}

# ---- network: routes, bridge, firewall (before anything starts) -------------------------------

rn_net_down() {
  # Best effort and idempotent: also used to clear what a crashed run left.
  while iptables -D FORWARD -j RAYOP-FWD 2>/dev/null; do :; done
  while iptables -D OUTPUT -m cgroup --path "${RN_CGROUP#/sys/fs/cgroup/unified}" -j RAYOP-EGRESS 2>/dev/null; do :; done
  for c in RAYOP-FWD RAYOP-EGRESS; do iptables -F "$c" 2>/dev/null || true; iptables -X "$c" 2>/dev/null || true; done
  ip link del "$RN_BRIDGE" 2>/dev/null || true
  # The blackholes go last: until the bridge is gone they keep the ranges from routing anywhere.
  ip route del blackhole "$RN_SVC_CIDR" 2>/dev/null || true
  ip route del blackhole "$RN_POD_CIDR" metric 4000 2>/dev/null || true
}

rn_net_up() {
  # Blackholes first. The pod range's has a higher metric than the bridge's connected route (metric 0),
  # so it is used exactly when the bridge is down or missing.
  ip route replace blackhole "$RN_SVC_CIDR"
  ip route replace blackhole "$RN_POD_CIDR" metric 4000
  ip link add "$RN_BRIDGE" type bridge
  ip addr add "$RN_GW/16" dev "$RN_BRIDGE"
  ip link set "$RN_BRIDGE" up
  # Forward only what arrives on the bridge (pod -> ClusterIP -> other pod); ip_forward stays as it is.
  sysctl -qw "net.ipv4.conf.$RN_BRIDGE.forwarding=1"
  iptables -N RAYOP-FWD
  iptables -A RAYOP-FWD -i "$RN_BRIDGE" -o "$RN_BRIDGE" -j ACCEPT
  iptables -A RAYOP-FWD -i "$RN_BRIDGE" -j DROP
  iptables -A RAYOP-FWD -o "$RN_BRIDGE" -j DROP
  iptables -I FORWARD 1 -j RAYOP-FWD
  mkdir -p "$RN_CGROUP"
  iptables -N RAYOP-EGRESS
  for dst in 127.0.0.0/8 "$RN_POD_CIDR" "$RN_SVC_CIDR"; do iptables -A RAYOP-EGRESS -d "$dst" -j RETURN; done
  iptables -A RAYOP-EGRESS -j REJECT
  iptables -I OUTPUT 1 -m cgroup --path "${RN_CGROUP#/sys/fs/cgroup/unified}" -j RAYOP-EGRESS
}

# Like `start`, but the process (and all it starts) runs in the egress-filtered cgroup.
rn_start() {
  local name=$1; shift
  # shellcheck disable=SC2016 # $$ and $@ are the inner shell's
  setsid bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$RN_CGROUP" "$@" >"$D/$name.log" 2>&1 </dev/null &
  echo "$! $name" >>"$D/pids"
}

# ---- PKI for the node ------------------------------------------------------------------------

rn_pki() {
  (
    cd "$D/pki" || exit 1
    sign() { # $1=stem $2=subject $3=extensions
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2"
      printf '%b' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -out "$1.crt" -extfile "$1.ext"
    }
    sign kubelet-client "/O=system:nodes/CN=system:node:$RN_NODE" \
      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    sign kubelet-serving "/O=system:nodes/CN=system:node:$RN_NODE" \
      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:$RN_GW,DNS:$RN_NODE\n"
  ) >>"$D/pki.log" 2>&1
}

# ---- images ------------------------------------------------------------------------------------

# A tiny image made here from Debian's busybox-static (no registry involved): the harness's own
# test fixture, and the sandbox ("pause") image until e2e/images/build provides one.
rn_fixture_images() {
  local out
  out=$cache_root/node-fixtures/busybox-$(sha256sum /bin/busybox | cut -c1-12)
  if [[ -f "$out/.complete" ]]; then echo "$out"; return; fi
  rm -rf "$out.partial" && mkdir -p "$out.partial"
  # set -e again: this runs inside $(...), where bash drops errexit, and a half-made image must
  # never be marked complete.
  (
    set -e
    cd "$out.partial"
    umoci init --layout oci
    umoci new --image oci:busybox
    umoci unpack --image oci:busybox bundle
    mkdir -p bundle/rootfs/bin bundle/rootfs/etc bundle/rootfs/tmp
    cp /bin/busybox bundle/rootfs/bin/busybox
    bundle/rootfs/bin/busybox --list | while read -r a; do
      [[ "$a" == busybox ]] || ln -sf busybox "bundle/rootfs/bin/$a"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >bundle/rootfs/etc/passwd
    echo 'root:x:0:' >bundle/rootfs/etc/group
    umoci repack --image oci:busybox bundle
    umoci config --image oci:busybox --config.cmd /bin/sh --config.env PATH=/bin
    # A sandbox container: PID 1 that exits on TERM and otherwise sleeps.
    umoci config --image oci:busybox --tag pause --clear=config.cmd \
      --config.entrypoint /bin/sh --config.entrypoint -c \
      --config.entrypoint 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'
    rm -rf bundle
  ) >"$D/fixture-image.log" 2>&1 || { log "fixture image failed:"; tail -n 5 "$D/fixture-image.log" >&2; return 1; }
  mv "$out.partial" "$out" && touch "$out/.complete"
  echo "$out"
}

# Lines `name=<oci-layout-dir>:<tag>` for every image to push.
rn_image_sources() {
  local fx; fx=$(rn_fixture_images) || return 1
  echo "busybox=$fx/oci:busybox"
  local have_pause=0 line
  # CP_REAL_NODE_IMAGES: unset = every image of e2e/images/build, `0` = none (the fixtures only),
  # otherwise the names to build, e.g. "pause ray".
  local want=${CP_REAL_NODE_IMAGES-}
  if [[ -x "$here/images/build" && "$want" != 0 ]]; then
    local t0 names=()
    t0=$(date +%s.%N)
    read -r -a names <<<"$want"
    "$here/images/build" ${names[@]+"${names[@]}"} >"$D/images-build.out" 2>"$D/images-build.log" \
      || { log "e2e/images/build failed:"; tail -n 20 "$D/images-build.log" >&2; return 1; }
    log "e2e/images/build: $(rn_elapsed "$t0") s"
    while IFS= read -r line; do
      [[ "$line" =~ ^[a-z0-9-]+=.+:.+$ ]] || continue
      echo "$line"
      [[ "$line" == pause=* ]] && have_pause=1
    done <"$D/images-build.out"
  fi
  (( have_pause )) || echo "pause=$fx/oci:pause"
}

rn_ref_for() { # image name from e2e/images/build -> the reference the node pulls it as
  case $1 in
    ray) echo "$RN_RAY_REF" ;;
    operator) echo "$RN_OPERATOR_REF" ;;
    pause) echo "$RN_PAUSE_REF" ;;
    busybox) echo "$RN_BUSYBOX_REF" ;;
    *) echo "docker.io/ray-operator-test/$1:latest" ;;
  esac
}

rn_push_images() {
  local t0 line name src ref
  : >"$D/images"
  t0=$(date +%s.%N)
  while IFS= read -r line; do
    name=${line%%=*}; src=${line#*=}
    ref=$(rn_ref_for "$name")
    # Blobs already in the (cached) registry are skipped, so a warm push only compares digests.
    skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$src" \
      "docker://127.0.0.1:$RN_REGISTRY_PORT/$(rn_repo_path "$ref")" >>"$D/push.log" 2>&1 \
      || { log "push of $name ($src) failed:"; tail -n 5 "$D/push.log" >&2; return 1; }
    echo "$name=$ref" >>"$D/images"
  done <"$D/image-sources"
  log "images pushed in $(rn_elapsed "$t0") s: $(cut -d= -f1 "$D/images" | tr '\n' ' ')"
}

# ---- the node -------------------------------------------------------------------------------

rn_registry_up() {
  RN_REGISTRY_PORT=$(free_port)
  echo "$RN_REGISTRY_PORT" >"$D/registry-port"
  mkdir -p "$RN_REGISTRY_STORE"
  cat >"$D/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $RN_REGISTRY_STORE}
  delete: {enabled: true}
http: {addr: "127.0.0.1:$RN_REGISTRY_PORT"}
EOF
  rn_start registry docker-registry serve "$D/registry.yml"
  wait_for registry 20 curl -fs --max-time 2 "http://127.0.0.1:$RN_REGISTRY_PORT/v2/"
}

rn_containerd_up() {
  local c=$D/containerd
  mkdir -p "$c/certs.d" "$D/cni/net.d"
  # Every registry name goes to the local registry; `server` is the fallback, so it is local too.
  local h
  for h in _default docker.io ghcr.io registry.k8s.io quay.io gcr.io k8s.gcr.io; do
    mkdir -p "$c/certs.d/$h"
    cat >"$c/certs.d/$h/hosts.toml" <<EOF
server = "http://127.0.0.1:$RN_REGISTRY_PORT"
[host."http://127.0.0.1:$RN_REGISTRY_PORT"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
EOF
  done
  cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[debug]
  address = "$c/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$RN_PAUSE_REF"
  # These machines withhold CAP_SYS_RESOURCE: a negative oom_score_adj cannot be written.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$c/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$c/certs.d"
EOF
  # Pod addresses from 10.88.0.0/16 on our bridge; the only routes are the bridge's subnet (connected,
  # from the /16 address) and the Service range via the gateway: no default route.
  cat >"$D/cni/net.d/10-ray-operator.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "ray-operator-real-node",
  "plugins": [
    {
      "type": "bridge", "bridge": "$RN_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$RN_POD_CIDR", "rangeStart": "10.88.0.10", "gateway": "$RN_GW"}]],
        "routes": [{"dst": "$RN_SVC_CIDR"}],
        "dataDir": "$D/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  rn_start containerd containerd --config "$c/config.toml"
  wait_for containerd 30 ctr --address "$c/containerd.sock" version
}

rn_coredns_up() {
  RN_DNS_PORT=$(free_port)
  echo "$RN_DNS_PORT" >"$D/dns-port"
  local health ready
  health=$(free_port); ready=$(free_port)
  # Only the cluster's zones. A name outside them matches no server block, and CoreDNS answers
  # REFUSED: there is no `forward`, so nothing asks the machine's resolver.
  cat >"$D/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
  bind $RN_GW
  errors
  health 127.0.0.1:$health
  ready 127.0.0.1:$ready
  kubernetes cluster.local in-addr.arpa ip6.arpa {
    kubeconfig $D/admin.kubeconfig
    pods insecure
    fallthrough in-addr.arpa ip6.arpa
    ttl 5
  }
  cache 5
  loop
}
cluster.local:$RN_DNS_PORT in-addr.arpa:$RN_DNS_PORT ip6.arpa:$RN_DNS_PORT {
  bind 127.0.0.1
  errors
  kubernetes cluster.local in-addr.arpa ip6.arpa {
    kubeconfig $D/admin.kubeconfig
    pods insecure
    fallthrough in-addr.arpa ip6.arpa
    ttl 5
  }
  cache 5
}
EOF
  rn_start coredns "$node_bin/coredns" -conf "$D/Corefile"
  wait_for coredns 30 curl -fs --max-time 2 "http://127.0.0.1:$ready/ready"
}

rn_api_relay_up() {
  # The apiserver stays on 127.0.0.1; pods reach it as the `kubernetes` Service, whose endpoint is this
  # relay on the bridge address.
  rn_start api-relay socat "TCP-LISTEN:6443,bind=$RN_GW,reuseaddr,fork" "TCP:127.0.0.1:$API_PORT"
  wait_for api-relay 10 bash -c "</dev/tcp/$RN_GW/6443"
  "$bin/kubectl" --kubeconfig "$D/admin.kubeconfig" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Endpoints
metadata:
  name: kubernetes
  namespace: default
  labels: {endpointslice.kubernetes.io/skip-mirror: "true"}
subsets:
- addresses: [{ip: $RN_GW}]
  ports: [{name: https, port: 6443, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes}
addressType: IPv4
endpoints:
- addresses: [$RN_GW]
  conditions: {ready: true}
ports: [{name: https, port: 6443, protocol: TCP}]
EOF
}

rn_kubelet_up() {
  local k=$D/kubelet
  mkdir -p "$k/root" "$k/pod-logs" "$k/volume-plugins"
  : >"$k/resolv.conf" # empty: pods get only the cluster DNS, no host resolver behind it
  kubeconfig "$k/kubeconfig" "    client-certificate: $D/pki/kubelet-client.crt
    client-key: $D/pki/kubelet-client.key"
  local healthz; healthz=$(free_port)
  cat >"$k/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroups here are v1 (with an empty v2 hierarchy); containerd 1.6 does not report its cgroup driver.
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$D/containerd/containerd.sock
imageServiceEndpoint: unix://$D/containerd/containerd.sock
address: $RN_GW
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
tlsCertFile: $D/pki/kubelet-serving.crt
tlsPrivateKeyFile: $D/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $D/pki/ca.crt}
authorization: {mode: Webhook}
clusterDNS: [$RN_GW]
clusterDomain: cluster.local
resolvConf: $k/resolv.conf
podLogsDir: $k/pod-logs
volumePluginDir: $k/volume-plugins
failSwapOn: false
serializeImagePulls: false
maxPods: 110
podPidsLimit: 4096
# A small shared machine: never evict test pods for disk or memory pressure, never GC images.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
EOF
  rn_start kubelet "$node_bin/kubelet" --config="$k/config.yaml" --kubeconfig="$k/kubeconfig" \
    --root-dir="$k/root" --cert-dir="$k/pki" --hostname-override="$RN_NODE" --node-ip="$RN_GW" \
    --node-labels=ray-operator.test/node=real --v=1
}

rn_kube_proxy_up() {
  local metrics healthz
  metrics=$(free_port); healthz=$(free_port)
  cat >"$D/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $D/admin.kubeconfig}
mode: iptables
clusterCIDR: $RN_POD_CIDR
hostnameOverride: $RN_NODE
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:$healthz
metricsBindAddress: 127.0.0.1:$metrics
# NodePorts only on the bridge address, never on the machine's own interfaces or on loopback
# (localhost NodePorts would need route_localnet).
nodePortAddresses: ["$RN_GW/32"]
iptables: {masqueradeAll: true, localhostNodePorts: false, syncPeriod: 30s, minSyncPeriod: 0s}
# Leave the machine's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  rn_start kube-proxy "$node_bin/kube-proxy" --config="$D/kube-proxy.yaml" --v=1
  wait_for kube-proxy 30 curl -fs --max-time 2 "http://127.0.0.1:$healthz/healthz"
}

# Called by cmd_up after the control plane is ready.
rn_up() {
  local t0 t
  t0=$(date +%s.%N)
  echo "$node_bin" >"$D/node-bindir"
  rn_pki
  t=$(date +%s.%N); rn_registry_up; rn_push_images
  t=$(date +%s.%N); rn_containerd_up; log "containerd up in $(rn_elapsed "$t") s"
  rn_coredns_up
  rn_api_relay_up
  t=$(date +%s.%N)
  rn_kubelet_up
  wait_for kubelet 120 "$bin/kubectl" --kubeconfig "$D/admin.kubeconfig" wait --for=condition=Ready \
    "node/$RN_NODE" --timeout=1s
  log "kubelet registered $RN_NODE Ready in $(rn_elapsed "$t") s"
  rn_kube_proxy_up
  log "real node up in $(rn_elapsed "$t0") s"
}

# ---- teardown -------------------------------------------------------------------------------

rn_kill_named() { # $1=dir $2...=component names from $1/pids
  local d=$1; shift
  local name p pids=()
  for name in "$@"; do
    p=$(awk -v n="$name" '$2 == n {print $1}' "$d/pids")
    [[ -n "$p" ]] && pids+=("$p")
  done
  (( ${#pids[@]} )) || return 0
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.2
  done
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}

rn_rm_kubepods() {
  local ctl left
  for _ in $(seq 1 25); do
    left=0
    for ctl in /sys/fs/cgroup/*/kubepods; do
      [[ -d "$ctl" ]] || continue
      find "$ctl" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [[ -d "$ctl" ]] && left=1
    done
    (( left )) || return 0
    sleep 0.2
  done
  log "kubepods cgroups still busy: $(ls -d /sys/fs/cgroup/*/kubepods 2>/dev/null | tr '\n' ' ')"
}

# Stops the node and removes everything it changed on the machine. Called by cmd_down with the
# cluster dir before the control plane goes.
rn_down() (
  # Best effort, every step: a pipeline that fails because a process or cgroup vanished while we
  # looked (or found nothing) must not stop the rest of the clean-up.
  set +e +o pipefail
  local d=$1 sock=$1/containerd/containerd.sock
  # kubelet first, so nothing restarts containers; kube-proxy then cleans its own rules.
  rn_kill_named "$d" kubelet kube-proxy
  local nb; nb=$(cat "$d/node-bindir" 2>/dev/null || true)
  if [[ -x "$nb/kube-proxy" ]]; then "$nb/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  # The kubelet's own chains (kube-proxy --cleanup leaves them): its localnet firewall and canaries.
  local ipt table
  for ipt in iptables ip6tables; do
    while "$ipt" -D INPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
    while "$ipt" -D OUTPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
    if "$ipt" -F KUBE-FIREWALL 2>/dev/null; then "$ipt" -X KUBE-FIREWALL 2>/dev/null; fi
    for table in filter nat mangle; do
      "$ipt" -t "$table" -X KUBE-KUBELET-CANARY 2>/dev/null || true
    done
    "$ipt" -t mangle -X KUBE-IPTABLES-HINT 2>/dev/null || true
  done
  # Every container process lives in the kubepods cgroups: kill them all there.
  local cg p
  for _ in 1 2 3; do
    for cg in /sys/fs/cgroup/pids/kubepods /sys/fs/cgroup/memory/kubepods; do
      [[ -d "$cg" ]] || continue
      find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r p; do kill -KILL "$p" 2>/dev/null || true; done
    done
    sleep 0.3
  done
  if [[ -S "$sock" ]]; then
    local id
    for id in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
      ctr --address "$sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr --address "$sock" -n k8s.io containers ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io containers delete "$id" >/dev/null 2>&1 || true
    done
  fi
  rn_kill_named "$d" containerd coredns api-relay registry
  # Shims outlive containerd by design; ours name our socket on their command line.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -- "containerd-shim.* -address $sock"; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  # Pod network namespaces (ours hold an address of the pod range) and every mount under the dir.
  local ns
  for ns in /run/netns/cni-*; do
    [[ -e "$ns" ]] || continue
    if ip netns exec "${ns##*/}" ip -4 -o addr show 2>/dev/null | grep -q ' 10\.88\.'; then
      umount -l "$ns" 2>/dev/null || true; rm -f "$ns"
    fi
  done
  findmnt -rn -o TARGET | grep -F "$d/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  # kubepods cgroups, deepest first, in every hierarchy; a killed process may take a moment to be
  # reaped, and its cgroup cannot go before that.
  rn_rm_kubepods
  rmdir "$RN_CGROUP" 2>/dev/null || true
  rn_net_down
  if [[ -f "$RN_LOCK" && "$(cat "$RN_LOCK")" == "$d" ]]; then rm -f "$RN_LOCK"; fi
  return 0
)

# Refuses a second real node; clears what a crashed one left.
rn_claim() {
  local other
  if [[ -f "$RN_LOCK" ]]; then
    other=$(cat "$RN_LOCK")
    if [[ -s "$other/pids" ]]; then
      local p alive=0
      for p in $(awk '{print $1}' "$other/pids"); do kill -0 "$p" 2>/dev/null && alive=1; done
      if (( alive )); then
        log "a real node already runs on this machine ($other): one at a time (CP_DIR=$other e2e/cluster down)"
        return 1
      fi
      rn_down "$other"
    fi
  fi
  rn_net_down
  rn_rm_kubepods
  mkdir -p "$cache_root"
  echo "$D" >"$RN_LOCK"
}
