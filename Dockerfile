# imdsd's image, built FROM scratch so that no registry is needed.
#
# Do not run `docker build .` on the repository: this file expects the build context that
# scripts/build-image assembles, whose rootfs/ already holds the binary at /usr/local/bin/imdsd,
# the shared libraries it links (when it is not static), the CA bundle, /tmp and /var/lib/imdsd:
#
#   cargo build --release && scripts/build-image            # -> imdsd:local
#
# The same image is the in-container client of the end-to-end tests: `imdsd probe` asks a
# metadata service for credentials the way an AWS SDK does and prints one JSON line.
FROM scratch

COPY rootfs/ /

# Where the daemon keeps its IMDSv2 token key; mount a volume here to keep tokens valid across
# container restarts.
ENV IMDSD_STATE_DIR=/var/lib/imdsd
# The AWS SDK reads ~/.aws (docker-compose.yml mounts the operator's there).
ENV HOME=/root

EXPOSE 80

ENTRYPOINT ["/usr/local/bin/imdsd"]
