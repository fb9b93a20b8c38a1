# A Headroom service: one statically linked binary in an empty root, and
# the probe its health check runs (there is no shell or curl here).
FROM scratch
ARG BIN
COPY target/x86_64-unknown-linux-gnu/release/${BIN} /service
COPY target/x86_64-unknown-linux-gnu/release/headroom-probe /probe
ENTRYPOINT ["/service"]
