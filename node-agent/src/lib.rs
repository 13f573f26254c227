//! `ambit-agent`: Ambit's node agent.
//!
//! It answers the CNI plugin for every pod of its node, decides which pods are enrolled, and for those enters
//! the pod's network namespace to install the redirection rules ([`rules`]) and open the pod's listening
//! sockets ([`listeners`]), then hands the pod to ztunnel over ZDS ([`zds`]) and answers the plugin only once
//! ztunnel has acknowledged it.
//!
//! The decisions are [`enrolment`], a state machine without I/O (events in, commands out), tested without
//! root against a model of the world; [`agent`] is the shell that carries its commands out. The plugin's
//! socket ([`cniserver`]) and the Kubernetes controller ([`k8s`]) reach the agent over channels. Every failure
//! a plugin sees is an [`error::EnrolError`], mapped to the API's codes in one place. Modules that touch the
//! kernel are [`netns`], [`rules::apply`], [`rules::routing`] and [`listeners`].

#![forbid(unsafe_code)]

pub mod agent;
pub mod cniserver;
pub mod config;
pub mod debug;
pub mod enrol;
pub mod enrolment;
pub mod error;
pub mod health;
pub mod installer;
pub mod k8s;
pub mod listeners;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod rules;
pub mod zds;
