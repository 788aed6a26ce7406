# relufit worker AMI with Packer: Ubuntu LTS + python3-venv + the relufit venv (bootstrap.sh).
# The bootstrap script is relufit's package data, orchestrator/data/bootstrap.sh (the one copy
# EC2 user-data and `relufit deploy` use too); run this template from a checkout.
#
#   packer init ami/relufit.pkr.hcl
#   packer build -var region=us-east-1 ami/relufit.pkr.hcl
#   # with relufit itself baked in (a wheel built by `relufit deploy`, found under
#   # ~/.relufit/wheels/<hash>/):
#   packer build -var wheel=$HOME/.relufit/wheels/<hash>/relufit-0.1.0-py3-none-any.whl \
#     ami/relufit.pkr.hcl
#
# `relufit ami build` does the same with boto3 and relufit's own SSH (no Packer needed) and
# also ships the dependency wheels. Either way the image is tagged relufit:ami, which
# `relufit cluster up` prefers over plain Ubuntu. Untested here: Packer is not installed in
# relufit's CI; `packer validate ami/relufit.pkr.hcl` checks it.

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "c5.large"
}

variable "arch" {
  type        = string
  default     = "amd64"
  description = "amd64 or arm64; must match instance_type (c5 -> amd64, c7g -> arm64)"
}

variable "wheel" {
  type        = string
  default     = ""
  description = "optional relufit wheel to install in the venv (from the index, with its dependencies)"
}

variable "version" {
  type    = string
  default = "0.1.0"
}

locals {
  stamp     = formatdate("YYYYMMDD-hhmmss", timestamp())
  bootstrap = "${path.root}/../orchestrator/data/bootstrap.sh"
}

source "amazon-ebs" "relufit" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "ubuntu"
  ami_name      = "relufit-node-${local.stamp}"
  ami_description = "relufit worker image ${var.version}"

  source_ami_filter {
    filters = {
      name                = "ubuntu/images/hvm-ssd*/ubuntu-noble-24.04-${var.arch}-server-*"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
      state               = "available"
    }
    owners      = ["099720109477"] # Canonical
    most_recent = true
  }

  # the same hardening relufit applies to its own instances
  metadata_options {
    http_tokens                 = "required"
    http_endpoint               = "enabled"
    http_put_response_hop_limit = 1
  }
  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = 16
    volume_type           = "gp3"
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    "relufit:ami" = var.version
    Name          = "relufit-node-${local.stamp}"
  }
  snapshot_tags = {
    "relufit:ami" = var.version
  }
  run_tags = {
    "relufit:role" = "ami-builder"
  }
}

build {
  sources = ["source.amazon-ebs.relufit"]

  provisioner "file" {
    source      = local.bootstrap
    destination = "/tmp/relufit-bootstrap.sh"
  }

  # python3, python3-venv and ~/.relufit/venv for the login user (apt via passwordless sudo)
  provisioner "shell" {
    inline = [
      "cloud-init status --wait || true",
      "sh /tmp/relufit-bootstrap.sh prepare",
    ]
  }

  provisioner "file" {
    source      = var.wheel == "" ? local.bootstrap : var.wheel
    destination = var.wheel == "" ? "/tmp/relufit-unused" : "/tmp/${basename(var.wheel)}"
  }

  provisioner "shell" {
    inline = [
      var.wheel == "" ? "echo 'no wheel given: relufit deploy installs relufit later'" : "sh /tmp/relufit-bootstrap.sh install --index --wheel /tmp/${basename(var.wheel)}",
      "rm -f /tmp/relufit-unused ~/.bash_history",
      "sudo cloud-init clean --logs",
    ]
  }
}
