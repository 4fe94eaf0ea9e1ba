# Shared by benches/tls-upstream.sh and pgo/train.sh (sourced, not run): a free loopback port,
# test certificates, and the nginx upstream both put their gateways in front of.

# A port on 127.0.0.1 that was free a moment ago.
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# certs DIR NAME...: a CA (DIR/ca.pem, DIR/ca.key) and, per NAME, DIR/NAME.pem and DIR/NAME.key:
# a certificate for 127.0.0.1 signed by it.
certs() {
  local d=$1 name
  shift
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=keygate test CA" \
    -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\n' >"$d/san.ext"
  for name in "$@"; do
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$d/$name.key" \
      -out "$d/$name.csr" 2>/dev/null
    openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
      -days 2 -extfile "$d/san.ext" -out "$d/$name.pem" 2>/dev/null
  done
}

# upstream_conf DIR PLAIN_PORT TLS_PORT: DIR/upstream.conf, one nginx answering every request
# `200 ok` on both ports (TLS with DIR/up.pem from `certs DIR up`), keep-alive without limits.
# Sets nginx_common and temp_paths for the caller's other nginx configs in DIR.
upstream_conf() {
  local d=$1
  mkdir -p "$d/tmp"
  nginx_common="worker_rlimit_nofile 20000; error_log $d/nginx.log warn; events { worker_connections 9000; }"
  temp_paths="client_body_temp_path $d/tmp/b; proxy_temp_path $d/tmp/p; fastcgi_temp_path $d/tmp/f; uwsgi_temp_path $d/tmp/u; scgi_temp_path $d/tmp/s;"
  cat >"$d/upstream.conf" <<CONF
$nginx_common
pid $d/upstream.pid;
http {
    access_log off; $temp_paths
    keepalive_timeout 300s; keepalive_requests 100000000; server_tokens off;
    server {
        listen 127.0.0.1:$2 backlog=4096;
        listen 127.0.0.1:$3 ssl backlog=4096;
        ssl_certificate $d/up.pem; ssl_certificate_key $d/up.key;
        location / { default_type text/plain; return 200 "ok\n"; }
    }
}
CONF
}
