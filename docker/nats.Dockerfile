# nats-server with JetStream, from the pinned static binary: nothing pulled.
# The whole nats/ directory is copied, so a compose file picks the
# configuration (secure.conf, cluster.conf) with its command.
FROM scratch
COPY target/tools/nats-server-2.15.1/nats-server /nats-server
COPY target/x86_64-unknown-linux-gnu/release/headroom-probe /probe
COPY nats/ /etc/nats/
EXPOSE 4222 6222 8222
ENTRYPOINT ["/nats-server", "-sd", "/data/jetstream"]
CMD ["-c", "/etc/nats/nats.conf"]
